"""The long-prompt demo (`mnemosyne demo`, what `make up` runs for now).

Builds a document of a few thousand tokens (an almanac of real facts about countries), asks a question
whose answer is in it, runs the request through the in-process engine with chunked prefill, and
prints the answer with its time to first token, time between tokens and throughput.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

# (country, capital, continent, language, currency)
COUNTRIES = [
    ("France", "Paris", "Europe", "French", "euro"),
    ("Germany", "Berlin", "Europe", "German", "euro"),
    ("Italy", "Rome", "Europe", "Italian", "euro"),
    ("Spain", "Madrid", "Europe", "Spanish", "euro"),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro"),
    ("Netherlands", "Amsterdam", "Europe", "Dutch", "euro"),
    ("Belgium", "Brussels", "Europe", "Dutch, French and German", "euro"),
    ("Austria", "Vienna", "Europe", "German", "euro"),
    ("Switzerland", "Bern", "Europe", "German, French, Italian and Romansh", "Swiss franc"),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty"),
    ("Czechia", "Prague", "Europe", "Czech", "Czech koruna"),
    ("Hungary", "Budapest", "Europe", "Hungarian", "forint"),
    ("Greece", "Athens", "Europe", "Greek", "euro"),
    ("Sweden", "Stockholm", "Europe", "Swedish", "Swedish krona"),
    ("Norway", "Oslo", "Europe", "Norwegian", "Norwegian krone"),
    ("Denmark", "Copenhagen", "Europe", "Danish", "Danish krone"),
    ("Finland", "Helsinki", "Europe", "Finnish and Swedish", "euro"),
    ("Ireland", "Dublin", "Europe", "Irish and English", "euro"),
    ("United Kingdom", "London", "Europe", "English", "pound sterling"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic", "Icelandic krona"),
    ("Romania", "Bucharest", "Europe", "Romanian", "leu"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian", "hryvnia"),
    ("Turkey", "Ankara", "Asia and Europe", "Turkish", "Turkish lira"),
    ("Egypt", "Cairo", "Africa", "Arabic", "Egyptian pound"),
    ("Morocco", "Rabat", "Africa", "Arabic and Berber", "dirham"),
    ("Nigeria", "Abuja", "Africa", "English", "naira"),
    ("Kenya", "Nairobi", "Africa", "Swahili and English", "Kenyan shilling"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "birr"),
    ("Ghana", "Accra", "Africa", "English", "cedi"),
    ("South Africa", "Pretoria", "Africa", "eleven official languages", "rand"),
    ("Japan", "Tokyo", "Asia", "Japanese", "yen"),
    ("China", "Beijing", "Asia", "Mandarin Chinese", "renminbi"),
    ("India", "New Delhi", "Asia", "Hindi and English", "Indian rupee"),
    ("South Korea", "Seoul", "Asia", "Korean", "won"),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian", "rupiah"),
    ("Philippines", "Manila", "Asia", "Filipino and English", "Philippine peso"),
    ("Pakistan", "Islamabad", "Asia", "Urdu and English", "Pakistani rupee"),
    ("Iran", "Tehran", "Asia", "Persian", "rial"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic", "riyal"),
    ("Israel", "Jerusalem", "Asia", "Hebrew", "new shekel"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian", "tugrik"),
    ("Nepal", "Kathmandu", "Asia", "Nepali", "Nepalese rupee"),
    ("Australia", "Canberra", "Oceania", "English", "Australian dollar"),
    ("New Zealand", "Wellington", "Oceania", "English and Maori", "New Zealand dollar"),
    ("Canada", "Ottawa", "North America", "English and French", "Canadian dollar"),
    ("United States", "Washington, D.C.", "North America", "English", "US dollar"),
    ("Mexico", "Mexico City", "North America", "Spanish", "Mexican peso"),
    ("Cuba", "Havana", "North America", "Spanish", "Cuban peso"),
    ("Brazil", "Brasilia", "South America", "Portuguese", "real"),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "Argentine peso"),
    ("Chile", "Santiago", "South America", "Spanish", "Chilean peso"),
    ("Peru", "Lima", "South America", "Spanish and Quechua", "sol"),
    ("Colombia", "Bogota", "South America", "Spanish", "Colombian peso"),
    ("Venezuela", "Caracas", "South America", "Spanish", "bolivar"),
]
QUESTION = "According to the almanac, what is the capital of Japan?"


def entry(country: str, capital: str, continent: str, language: str, currency: str) -> str:
    return (f"{country} is a country in {continent}. Its capital city is {capital}. "
            f"People in {country} speak {language}, and they pay with the {currency}.")


def build_document(tokenizer, target_tokens: int) -> str:
    """An almanac of about `target_tokens` tokens (entries repeat, numbered, past the list's end)."""
    lines = ["The World Almanac. Each entry below describes one country."]
    n = 0
    while len(tokenizer.encode("\n".join(lines))) < target_tokens:
        c = COUNTRIES[n % len(COUNTRIES)]
        lines.append(f"Entry {n + 1}. " + entry(*c))
        n += 1
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from common.cli import build_engine, open_session, sampling_from_args, stream_one
    from common.model.tokenizer import IncrementalDecoder

    t_load = time.monotonic()
    checkpoint, tokenizer, max_len = open_session(args)
    document = build_document(tokenizer, args.doc_tokens)
    prompt = f"{document}\n\n{QUESTION}"
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = sampling_from_args(args)
    from common.engine.engine import validate_prompt
    validate_prompt(prompt_ids, checkpoint.config.vocab_size, max_len, params.max_tokens)
    engine = build_engine(args, checkpoint, tokenizer, min(len(prompt_ids) + params.max_tokens, max_len))
    load_s = time.monotonic() - t_load

    out = sys.stdout
    out.write(f"Mnemosyne demo: {checkpoint.source.rsplit('/', 1)[-1]} ({args.engine_dtype}, "
              f"{args.engine_attention_backend} attention), model loaded in {load_s:.1f} s\n")
    out.write(f"Prompt: an almanac of {len(document.splitlines()) - 1} entries, then the question\n"
              f"  {QUESTION!r}\n  = {len(prompt_ids)} tokens, prefilled in chunks of "
              f"{args.sched_chunk_size}\n\nAnswer: ")
    out.flush()
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)

    def show(token_id: int) -> None:
        out.write(decoder.push(token_id))
        out.flush()

    g = stream_one(engine, prompt_ids, params, on_token=show)
    out.write(decoder.flush() + "\n\n")
    tbt = sorted(g.tbt_s)
    out.write(f"TTFT            {g.ttft_s:.2f} s  (prefill {len(prompt_ids) / g.ttft_s:.0f} tokens/s)\n")
    if tbt:
        p90 = tbt[min(len(tbt) - 1, int(0.9 * len(tbt)))]
        out.write(f"TBT             median {1e3 * statistics.median(tbt):.1f} ms, p90 {1e3 * p90:.1f} ms\n")
        out.write(f"decode          {len(tbt) / sum(tbt):.1f} tokens/s "
                  f"({len(g.token_ids)} tokens, finished: {g.finish_reason})\n")
    total = g.ttft_s + sum(tbt)
    out.write(f"end to end      {total:.2f} s, {(len(prompt_ids) + len(g.token_ids)) / total:.0f} tokens/s\n")
    return 0
