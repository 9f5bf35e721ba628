"""The pure domain of hero-deployer: messages, decisions, ports. No I/O, no imports from outside."""
