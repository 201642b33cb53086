"""The models: vision encoder, Q-Former classifier, Hopfield memories, LLM, report generator."""
