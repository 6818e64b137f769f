"""Drafting previews with Claude: resolution notes and escalation packages.

Before an engineer confirms a Resolve or an Escalate, the web app shows a preview drafted
by a Sonnet model from the troubleshooting session. The worker drafts it on the
`drafting` queue (task `writeback.draft_preview`, see tasks/drafting.py) so a slow or
rate-limited model never delays a writeback.

Modules:
- `config`: settings from the environment (model, max tokens, timeout, retries); a
  missing ANTHROPIC_API_KEY is a DraftConfigError, failed at once, never retried.
- `prompts/*.md` + `prompting`: the prompt text, versioned (PROMPT_VERSION plus a digest
  of the exact text, recorded on every preview).
- `state`: the drafting input (title, ticket summary/description, transcript), its hash,
  and its rendering as escaped data inside <session>/<transcript>.
- `formats`: the two formats, checked on every reply (the escalation package's five
  sections; the resolution note's three labelled parts).
- `client`: one ask to the Messages API through the real `anthropic` SDK with
  `max_retries=0`; the only retry loop (tenacity) lives here.
- `drafter`: ask, check, re-ask once naming the problem, or fail with that reason.
- `service`: the preview cache keyed by (session, kind, state hash) and one execution.

Injection: session text is data. It is never put in the system prompt, never sent as API
turns of its own, and every `<`, `>` and `&` in it is escaped, so it cannot close the
<transcript> block; the system prompt says the block is untrusted; and whatever the model
answers, only a reply that passes the format check is stored.

Nothing here logs the API key or session text: logs carry preview and session ids, kind,
model, token counts, call counts and timings.
"""
