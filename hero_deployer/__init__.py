"""hero_deployer."""
