"""What a user runs: configuration, the CLI, the live analysis and its acquisition, the demo, the
replays and the live view."""
