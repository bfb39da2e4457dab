"""What people and programs use: the command line (``cli/``) and the HTTP server (``http/``)."""
