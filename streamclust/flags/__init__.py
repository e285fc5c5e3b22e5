"""Second-phase flags: the flagger and its criteria, the statistical tests, the mergeable sums the
distributed replay uses, the ZeroMQ event stream and the follow-up request/reply."""
