"""The SDK: a typed client of the wire contract, importing only the contract (`core`)."""
