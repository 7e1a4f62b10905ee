"""What makes judge.py's calls to a real API survive: the key and endpoint, retries, many requests in flight, a clean
stop, the bill.

    python judge.py ...      # every LLM verdict goes through ask_all, post_with_retries and run_all here

What it guards, measured against a loopback server that misbehaves on purpose
(tests/machinery/test_openai_client.py): a 429 with Retry-After, a 5xx, a timeout, a truncated JSON body and an
unparseable verdict each cost one retry and lose no verdict; a rejected key stops every thread after at most
--concurrency requests, with the key never printed; Ctrl-C or a fatal error wakes the threads that wait to retry and
drops the queue. judge.py shows the request itself (chat_completion) and keeps what is answered in judgments.jsonl,
so a re-run pays for nothing twice.
"""

import concurrent.futures
import os
import random
import threading

import requests

from machinery import common


class JudgeError(RuntimeError):
    """The judge cannot go on (key rejected, unknown model, server keeps failing); finished work stays cached."""


# The retry policy, all of it. Retried: 429 (rate limit), 5xx and 408/409 (the server's trouble), timeouts,
# dropped connections and a 200 whose body is not a chat completion. Fatal at once: 401/403 (the key), 404
# (unknown model or wrong base URL), 429 "insufficient_quota" (no credit), other 4xx (our request is wrong).
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_WAIT_S = 60.0


def retry_wait(attempt: int, backoff_s: float, retry_after: str | None) -> float:
    """Seconds before retry number attempt + 1: the server's Retry-After if it sent one (in seconds), else
    exponential backoff with jitter, backoff_s * 2^attempt * U(0.5, 1.5), so that the threads that failed
    together do not all come back together."""
    try:
        return min(float(retry_after), MAX_WAIT_S)
    except (TypeError, ValueError):  # absent, or an HTTP date: our own backoff is as good
        return min(backoff_s * 2**attempt * random.uniform(0.5, 1.5), MAX_WAIT_S)


def post_with_retries(send, s, base_url: str, api_key: str, stop: threading.Event) -> tuple[dict | None, int]:
    """One chat completion: send() -> requests.Response, retried per the policy above; returns (the answer's JSON,
    tries it took). s: judge.py's settings (max_retries, backoff_s, timeout_s, judge_model). A fatal error sets
    `stop`, and the other threads then give up their request at once, returning (None, tries)."""
    for attempt in range(s.max_retries + 1):
        if stop.is_set():
            return None, attempt
        retry_after = None
        try:
            r = send()
        except requests.Timeout:
            why = f"no answer within {s.timeout_s}s"
        except requests.ConnectionError:
            why = "cannot connect (is OPENAI_BASE_URL right?)"
        else:
            detail = r.text[:300].replace(api_key, "<key>")  # servers may echo part of the key; never print it
            if r.status_code == 200:
                try:
                    answer = r.json()
                    answer["choices"][0]["message"]["content"].strip()
                    return answer, attempt + 1
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    why = f"malformed answer {detail[:80]!r}"
            elif r.status_code in RETRYABLE_STATUS and "insufficient_quota" not in detail:
                why = f"HTTP {r.status_code}" + (" (rate limited)" if r.status_code == 429 else "")
                retry_after = r.headers.get("Retry-After")
            else:
                stop.set()
                if r.status_code in (401, 403):
                    raise JudgeError(f"key rejected by {base_url} (HTTP {r.status_code}): {detail}\n"
                                     "check OPENAI_API_KEY (and OPENAI_BASE_URL if you use another provider)")
                if r.status_code == 429:  # OpenAI's answer when the account is out of credit: waiting won't help
                    raise JudgeError(f"{base_url}: insufficient quota (HTTP 429) for this key: {detail}")
                if r.status_code == 404:
                    raise JudgeError(f"{base_url}/chat/completions answered 404: unknown judge model "
                                     f"{s.judge_model!r} or wrong OPENAI_BASE_URL: {detail}")
                raise JudgeError(f"{base_url} rejected the request (HTTP {r.status_code}): {detail}")
        if attempt == s.max_retries:
            break
        wait = retry_wait(attempt, s.backoff_s, retry_after)
        source = "as Retry-After asks" if retry_after is not None else "backoff"
        print(f"judge: {why} from {base_url}; waiting {wait:.1f}s ({source}), "
              f"then try {attempt + 2}/{s.max_retries + 1}")
        stop.wait(wait)
    stop.set()
    raise JudgeError(f"gave up on {base_url} after {s.max_retries + 1} tries (last: {why}); "
                     "finished judgments are cached, re-run later to resume")


def run_all(work, items: list, concurrency: int, record) -> None:
    """work(item, stop) for every item on `concurrency` threads, record(item, result) in this thread as each one
    finishes, with a progress line every tenth. A result of None (a request abandoned after another one failed) is
    not recorded. A fatal error or Ctrl-C sets `stop`, which wakes the threads waiting to retry, drops the queue,
    and is raised here."""
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(work, item, stop): item for item in items}
        try:
            for n_done, f in enumerate(concurrent.futures.as_completed(futures), 1):
                if (result := f.result()) is not None:
                    record(futures[f], result)
                if n_done % max(1, len(items) // 10) == 0:
                    print(f"judge: {n_done}/{len(items)}")
        except BaseException:
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise


def ask_all(bodies: list[dict], s, ask, record) -> None:
    """Send every Chat Completions request body: ask(body, base_url, api_key, stop) -> result (judge.py's
    openai_judgment) on s.concurrency threads (run_all), record(i, result) as each one finishes. The key comes from
    $OPENAI_API_KEY only and the endpoint from $OPENAI_BASE_URL (default OpenAI's); the key is never printed or
    written. Before: what it should cost (print_estimate); after: what it did cost (print_usage)."""
    api_key = os.environ.get("OPENAI_API_KEY", "")
    if not api_key:
        raise JudgeError(f"OPENAI_API_KEY is not set; export it to judge {len(bodies)} comparisons (samples are saved "
                         "and will be reused), or use --dataset=synthetic --judge=groundtruth")
    base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    print_estimate(base_url, [b["messages"][0]["content"] for b in bodies], common.get_tokenizer(), s.price_input,
                   s.price_output)
    results = {}
    run_all(lambda i, stop: ask(bodies[i], base_url, api_key, stop), list(range(len(bodies))), s.concurrency,
            lambda i, result: (results.__setitem__(i, result), record(i, result)))
    print_usage(list(results.values()), s.price_input, s.price_output)


def print_estimate(base_url: str, contents: list[str], enc, price_input: float, price_output: float) -> None:
    """What judging `contents` (the prompts to send) should cost: an estimate, with GPT-2's BPE standing in for the
    judge's tokenizer and ~60 output tokens per verdict."""
    est_in = sum(len(enc.encode_ordinary(c)) + 8 for c in contents)
    est_out = 60 * len(contents)
    print(f"judge: {len(contents)} requests to {base_url}, ~{est_in:,} input + ~{est_out:,} output tokens, "
          f"estimated ${(est_in * price_input + est_out * price_output) / 1e6:.4f} "
          f"at ${price_input}/${price_output} per 1M tokens")


def print_usage(rows: list[dict], price_input: float, price_output: float) -> None:
    """What the new judgments cost, from the tokens the API billed (each row's "usage") and the requests sent."""
    used_in = sum(r["usage"]["prompt_tokens"] for r in rows)
    used_out = sum(r["usage"]["completion_tokens"] for r in rows)
    sent = sum(r["requests"] for r in rows)
    print(f"judge: used {used_in:,} input + {used_out:,} output tokens = "
          f"${(used_in * price_input + used_out * price_output) / 1e6:.4f} "
          f"({sent} HTTP requests for {len(rows)} judgments; the difference is retries)")
