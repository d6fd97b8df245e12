"""One module per CLI command: each is a function taking its typed config, callable from
Python; run directories live here too."""
