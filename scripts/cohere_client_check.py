"""Calls a running `grating serve` through the official `cohere` Python client (v1 and v2
rerank) and checks the answers against the server's TEI endpoint, read over plain HTTP.

Usage: python cohere_client_check.py BASE_URL API_KEY
"""
import json
import sys
import urllib.request

import cohere

base_url, api_key = sys.argv[1], sys.argv[2]
query = "What is the giant panda?"
documents = [
    "Paris is the capital and most populous city of France.",
    "The giant panda is a bear species endemic to China, known for its black and white coat.",
    "Pandas is a Python library for data analysis.",
    "Red pandas are small mammals native to the eastern Himalayas.",
    "The stock market fell sharply on Tuesday.",
]

# Reference: every score, raw logits sorted, from the TEI shape over plain HTTP.
req = urllib.request.Request(
    base_url + "/rerank",
    data=json.dumps({"query": query, "texts": documents}).encode(),
    headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
)
reference = json.loads(urllib.request.urlopen(req).read())
ref_order = [r["index"] for r in reference]
ref_score = {r["index"]: r["score"] for r in reference}
assert ref_order[0] == 1, f"the panda passage should rank first: {reference}"


def check(results, top_n, with_docs):
    got = [r.index for r in results]
    assert got == ref_order[:top_n], (got, ref_order)
    for r in results:
        assert abs(r.relevance_score - ref_score[r.index]) < 1e-6, (r, ref_score)
        assert 0.0 <= r.relevance_score <= 1.0
        if with_docs:
            assert r.document is not None and r.document.text == documents[r.index], r
    scores = [r.relevance_score for r in results]
    assert scores == sorted(scores, reverse=True), scores


v1 = cohere.Client(api_key=api_key, base_url=base_url, max_retries=0)
r = v1.rerank(model="grating", query=query, documents=documents, top_n=3, return_documents=True)
check(r.results, 3, True)
assert r.id, r
print("cohere.Client.rerank (v1):", [(x.index, round(x.relevance_score, 4)) for x in r.results])

v2 = cohere.ClientV2(api_key=api_key, base_url=base_url, max_retries=0)
r = v2.rerank(model="grating", query=query, documents=documents, top_n=2, max_tokens_per_doc=512)
check(r.results, 2, False)
print("cohere.ClientV2.rerank (v2):", [(x.index, round(x.relevance_score, 4)) for x in r.results])

# A wrong key must surface as the client's 401 error.
bad = cohere.ClientV2(api_key="wrong-key", base_url=base_url, max_retries=0)
try:
    bad.rerank(model="grating", query=query, documents=documents, top_n=1)
except cohere.core.api_error.ApiError as e:
    assert e.status_code == 401, e
    print("wrong key: 401 as expected")
else:
    raise AssertionError("a wrong API key was accepted")
print("OK: the cohere client works against grating serve")
