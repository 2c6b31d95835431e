"""The OpenAI Responses API: `/v1/responses` and its stored responses."""
