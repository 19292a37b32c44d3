//! TLS for Gangplank: rustls server and client configs, certificate reload, a dev CA.
