"""elastic_llm."""
