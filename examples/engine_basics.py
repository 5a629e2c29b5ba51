"""Continuous batching, streaming and export/resume with the embedded model.

Run: .venv/bin/python examples/engine_basics.py
"""

from elastic_llm import LLMEngine, SamplingParams


def main() -> None:
    engine = LLMEngine()  # embedded SmolLM2-135M-Instruct
    params = SamplingParams(max_new_tokens=48)
    engine.add_request("sea", "Write a haiku about the sea.", params, chat=True)
    engine.add_request("paris", "What is the capital of France?", params, chat=True)
    for _ in range(8):  # a few iterations with both requests in one batch
        for output in engine.step():
            print(f"[{output.request_id}] {output.new_text!r}")
    # cut "sea" out mid-generation and continue it in a second engine
    state = engine.export_request("sea")
    print(f"exported 'sea' after {len(state.output_token_ids)} tokens, KV of {state.kv.length} positions")
    other = LLMEngine(engine.model)
    other.resume_request(state)
    while other.has_unfinished() or engine.has_unfinished():
        other.step()
        engine.step()
    print("sea:", other.pop_completion("sea").text)
    print("paris:", engine.pop_completion("paris").text)


if __name__ == "__main__":
    main()
