"""Stand-ins for hardware: a lamella phantom, a Merlin TCP detector server, an EDS publisher."""
