"""HTTP/1.1 pieces both roles use: header rules and the h11-on-relay glue."""
