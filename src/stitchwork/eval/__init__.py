"""Evaluation harnesses: measure the gateway against public benchmarks (AgentDojo) in the worst case."""
