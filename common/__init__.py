"""What every tradebus package shares and that depends on nothing: the root of its errors."""
