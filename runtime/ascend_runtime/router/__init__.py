"""The OpenAI-compatible router (unified balancing and PD routing)."""
