//! gangplank-endpoint library: the onboarding service.
