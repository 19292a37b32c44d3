//! OnboardingPolicy evaluation: which verified identities may join which WorkloadGroups.
