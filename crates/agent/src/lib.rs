//! gangplank-agent library: config, launchers, boot files and the onboarding loop.
