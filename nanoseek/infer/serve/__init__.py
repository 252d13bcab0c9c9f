"""The OpenAI-compatible server, its web page and the feedback store (`nanoseek serve`, `nanoseek feedback`)."""
