"""hero_deployer: the application, its entry points (CLI, web) and its SDK."""

VERSION = "0.1.0"
