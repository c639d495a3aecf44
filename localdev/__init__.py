"""Local tooling, never deployed (the deploy package is an allowlist of the function folders and
`shared/`): the local host that runs the three functions on RabbitMQ, the CLI (`python -m localdev`),
the operator commands, the local services for tests and the local run, the stand-in
integration-manager, sample data and the demo."""
