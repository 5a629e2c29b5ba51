"""Build the bundled prompt -> output-length sample: templated prompts answered by the real model.

The heavy-tailed samples (`elastic_llm/scheduling/heavy_tail.py`) draw output lengths independently
of the prompt, so no predictor can learn anything from them. This script makes a sample where the
prompt does carry information, the way real traffic mixes one-word answers, lists, code and essays:
it fills a dozen task templates with seeded choices, answers each prompt with the embedded default
model (SmolLM2-135M-Instruct, chat-formatted, greedy, up to `--max-new-tokens`) on our engine, and
writes one row per prompt: task family, prompt text, prompt tokens, output tokens, finish reason
and the chat-formatted prompt's token ids.

The prompts are SYNTHETIC (templates and word lists written here); the output lengths are measured.

    .venv/bin/python benchmarks/make_prompt_length_sample.py \
        --output elastic_llm/scheduling/data/smollm2_prompt_lengths.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTRIES = ("France", "Japan", "Brazil", "Kenya", "Canada", "India", "Egypt", "Norway", "Peru",
             "Vietnam", "Italy", "Mexico", "Spain", "Chile", "Turkey", "Ghana", "Poland", "Greece")
ANIMALS = ("a dolphin", "an owl", "a wolf", "a honeybee", "an octopus", "a penguin", "a tiger",
           "a salmon", "a bat", "a frog", "an elephant", "a crow", "a shark", "a spider")
TOPICS = ("photosynthesis", "the water cycle", "vaccines", "black holes", "inflation", "plate tectonics",
          "the internet", "electric cars", "compound interest", "machine learning", "the immune system",
          "volcanoes", "solar panels", "the stock market", "climate change", "DNA", "rainbows",
          "nuclear fusion", "the printing press", "supply and demand")
OBJECTS = ("fruits", "programming languages", "planets", "musical instruments", "board games",
           "European capitals", "types of clouds", "kitchen tools", "sports", "colors", "vegetables",
           "famous painters", "breakfast foods", "rivers")
SUBJECTS = ("a lost robot", "a lighthouse keeper", "a dragon who cannot fly", "a time traveler",
            "a small village during a storm", "a cat who becomes mayor", "two friends on a road trip",
            "a forgotten library", "the last tree on Earth", "a chef in space", "a shy ghost",
            "a detective in Venice")
TASKS = ("reverses a string", "checks whether a number is prime", "computes the factorial of n",
         "counts the vowels in a sentence", "merges two sorted lists", "finds the largest item in a list",
         "converts Celsius to Fahrenheit", "removes duplicates from a list", "checks for a palindrome",
         "returns the n-th Fibonacci number", "sorts a list of words by length", "sums the digits of a number")
PEOPLE = ("my manager", "a landlord", "a customer", "my teacher", "a colleague", "the city council",
          "a hotel", "my neighbour")
REASONS = ("a delayed shipment", "a broken heater", "asking for a day off", "a missed deadline",
           "a noisy construction site", "a refund request", "a project update", "a job application")
SENTENCES = ("The weather is nice today.", "Where is the train station?", "I would like a cup of coffee.",
             "My brother plays the guitar.", "We are going to the beach tomorrow.", "This book is very old.",
             "Can you help me, please?", "The museum opens at nine.")
WORDS = ("serendipity", "entropy", "democracy", "algorithm", "metaphor", "gravity", "irony", "momentum",
         "empathy", "osmosis", "latency", "recursion", "nostalgia", "ecosystem")


def _families(rng: random.Random) -> dict[str, str]:
    """One prompt of each task family, filled (and phrased) with `rng`'s choices."""
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    pick = rng.choice
    return {
        "one-word": pick((f"What is the capital of {pick(COUNTRIES)}? Answer with one word.",
                          f"Name the capital city of {pick(COUNTRIES)}. One word only.",
                          f"Which currency does {pick(COUNTRIES)} use? Answer in one word.")),
        "yes-no": pick((f"Is {pick(ANIMALS)} a mammal? Answer yes or no.",
                        f"Can {pick(ANIMALS)} fly? Answer yes or no.",
                        f"Does {pick(ANIMALS)} live in water? Yes or no.",
                        f"Is {pick(COUNTRIES)} in Europe? Answer yes or no.")),
        "arithmetic": pick((f"What is {a} plus {b}? Reply with the number only.",
                            f"Compute {a} times {b % 20 + 2}. Give only the result.",
                            f"What is {a} minus {b}? Answer with a number.")),
        "translate": pick((f"Translate into French: \"{pick(SENTENCES)}\"",
                           f"Translate into Spanish: \"{pick(SENTENCES)}\"",
                           f"Translate into German: \"{pick(SENTENCES)}\"")),
        "define": pick((f"Define the word \"{pick(WORDS)}\" in one sentence.",
                        f"Give a one-sentence definition of {pick(WORDS)}.",
                        f"What does \"{pick(WORDS)}\" mean? Be brief.")),
        "list": pick((f"List {rng.randint(3, 12)} {pick(OBJECTS)}.",
                      f"Name {rng.randint(3, 12)} {pick(OBJECTS)}, one per line.",
                      f"Give me a list of {rng.randint(3, 12)} {pick(OBJECTS)}.")),
        "explain": pick((f"Explain how {pick(TOPICS)} works.",
                         f"How does {pick(TOPICS)} work? Explain it to a student.",
                         f"Describe {pick(TOPICS)} and why it matters.")),
        "code": pick((f"Write a Python function that {pick(TASKS)}.",
                      f"Write a JavaScript function that {pick(TASKS)}, with comments.",
                      f"Show me Python code that {pick(TASKS)} and explain it.")),
        "email": pick((f"Write an email to {pick(PEOPLE)} about {pick(REASONS)}.",
                       f"Draft a polite letter to {pick(PEOPLE)} regarding {pick(REASONS)}.")),
        "story": pick((f"Write a story about {pick(SUBJECTS)}.",
                       f"Tell me a long story about {pick(SUBJECTS)}.",
                       f"Write a short fairy tale about {pick(SUBJECTS)}.")),
        "essay": pick((f"Write a detailed essay on {pick(TOPICS)}, with an introduction, "
                       "several paragraphs and a conclusion.",
                       f"Write a long article about {pick(TOPICS)} covering its history and future.")),
        "haiku": pick((f"Write a haiku about {pick(TOPICS)}.",
                       f"Write a haiku about {pick(ANIMALS)}.",
                       f"Write a two-line poem about {pick(SUBJECTS)}.")),
    }


def make_prompts(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (family, prompt) pairs, as even across the families as their templates allow."""
    rng = random.Random(seed)
    seen: set[str] = set()
    by_family: dict[str, list[str]] = {}
    for _ in range(200):
        for family, prompt in _families(rng).items():
            if prompt not in seen:
                seen.add(prompt)
                by_family.setdefault(family, []).append(prompt)
    rows: list[tuple[str, str]] = []
    depth = 0
    while len(rows) < count and any(depth < len(p) for p in by_family.values()):
        rows += [(family, prompts[depth]) for family, prompts in by_family.items() if depth < len(prompts)]
        depth += 1
    return rows[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=480, help="prompts (default 480)")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=48, help="requests in flight at once")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from elastic_llm.engine import LLMEngine
    from elastic_llm.sampling import SamplingParams

    torch.set_num_threads(2)
    engine = LLMEngine("SmolLM2-135M-Instruct")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    prompts = make_prompts(args.count, args.seed)
    results: dict[str, tuple[int, int, str, str]] = {}
    queue = list(enumerate(prompts))
    started, tokens = time.perf_counter(), 0
    while queue or engine.has_unfinished():
        while queue and engine.num_requests < args.batch:
            index, (_, prompt) = queue.pop(0)
            engine.add_request(f"p{index}", prompt, params, chat=True)
        for output in engine.step():
            if not output.finished:
                continue
            completion = engine.pop_completion(output.request_id)
            results[output.request_id] = (len(completion.prompt_token_ids), len(completion.token_ids),
                                          completion.finish_reason.value,
                                          " ".join(str(t) for t in completion.prompt_token_ids))
            tokens += len(completion.token_ids)
            if len(results) % 24 == 0:
                rate = tokens / (time.perf_counter() - started)
                print(f"[sample] {len(results)}/{len(prompts)} answered, {rate:.0f} tok/s", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["family", "prompt", "prompt_tokens", "output_tokens", "finish", "prompt_token_ids"])
        for index, (family, prompt) in enumerate(prompts):
            writer.writerow([family, prompt, *results[f"p{index}"]])
    print(f"[sample] wrote {len(prompts)} rows to {args.output} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
