"""The request and answer formats, shared by the HTTP server (container/) and the DJL handler (djl/).

Requests: `lmi_request` (LMI's `inputs`/`parameters`), `openai_chat_request` and `openai_completions` (on
`openai_fields`), `tgi` (on LMI's parameters); all map their fields to SamplingParams through
`sampling_fields.SamplingFields`, extending it with the fields they name their own way. Answers:
`lmi_answer` (LMI's JSON and streamed records; `Generation` collects the engine's outputs), `openai_answer`,
`openai_completions`, `tgi`; chat prompts, tools and structured-output fields beside them.
"""
