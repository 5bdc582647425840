"""Retrieval evaluation: the metrics by hand, the parsing of eval lines, and ``ragq eval``
end to end (a real worker, the real MiniLM model, the real embedded store).

The end-to-end figures are not hard-coded: they are recomputed here, by a separate
implementation of the formulas, from the rankings ``ragq search --json --top-k 10``
returns for the same queries, so the check goes through the queue both ways.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.evaluation import (
    METRICS,
    NO_PRODUCT,
    EvalError,
    EvalQuestion,
    EvalReport,
    QuestionResult,
    compare,
    load_report,
    rank_metrics,
    read_eval_file,
    read_eval_lines,
)
from producer.client import Client, RagqError
from tests.conftest import Stack

pytestmark = pytest.mark.timeout(600)

# --- metrics by hand ------------------------------------------------------------------

#: Two relevant pages; the first is found at rank 4, then again at rank 5 (a second
#: document with the same url earns nothing), the second at rank 7.
RANKING = ["x1", "x2", "x3", "r1", "r1", "x4", "r2", "x5", "x6", "x7"]
#: DCG = 1/log2(4+1) + 1/log2(7+1) = 0.430677 + 0.333333 = 0.764010
#: IDCG (2 relevant) = 1/log2(2) + 1/log2(3) = 1 + 0.630930 = 1.630930
NDCG_RANK_4_AND_7 = 0.764010 / 1.630930  # 0.468451


def test_two_relevant_hit_at_rank_4_duplicate_then_rank_7() -> None:
    m = rank_metrics(RANKING, {"r1", "r2"})
    assert m.first_rank == 4
    assert m.hits == {1: 0.0, 3: 0.0, 5: 1.0, 10: 1.0}
    assert m.mrr == 0.25
    assert m.ndcg == pytest.approx(NDCG_RANK_4_AND_7, abs=1e-6)
    assert m.as_row() == {"hit@1": 0.0, "hit@3": 0.0, "hit@5": 1.0, "hit@10": 1.0,
                          "mrr@10": 0.25, "ndcg@10": m.ndcg}


def test_miss_first_hit_and_edges() -> None:
    miss = rank_metrics(["a", "b", "c"], {"z"})
    assert (miss.first_rank, miss.mrr, miss.ndcg) == (None, 0.0, 0.0)
    assert set(miss.hits.values()) == {0.0}

    first = rank_metrics(["z", "a"], {"z"})
    assert (first.first_rank, first.mrr, first.ndcg) == (1, 1.0, 1.0)
    assert set(first.hits.values()) == {1.0}

    # Rank 2 with one relevant: hit@1 0, MRR 1/2, nDCG = (1/log2(3)) / 1 = 0.630930.
    second = rank_metrics(["a", "z", "b"], {"z"})
    assert second.hits == {1: 0.0, 3: 1.0, 5: 1.0, 10: 1.0}
    assert (second.mrr, second.ndcg) == (0.5, pytest.approx(0.630930, abs=1e-6))

    # Beyond the cut-off (top_k 12, the page at rank 11): reported, but worth nothing @10.
    deep = rank_metrics([f"x{i}" for i in range(10)] + ["z", "y"], {"z"})
    assert (deep.first_rank, deep.mrr, deep.ndcg) == (11, 0.0, 0.0)
    assert set(deep.hits.values()) == {0.0}

    # A relevant page repeated at ranks 1 and 2 counts once: DCG 1, IDCG 1 + 0.630930 = 0.613147.
    repeated = rank_metrics(["r1", "r1", "x"], {"r1", "r2"})
    assert repeated.ndcg == pytest.approx(1 / 1.630930, abs=1e-6)

    # More relevant pages than the cut-off: the ideal ranking is 10 deep, so all-relevant is 1.
    many = [f"r{i}" for i in range(12)]
    assert rank_metrics(many, set(many)).ndcg == pytest.approx(1.0)
    assert rank_metrics([], {"z"}).first_rank is None


def _q(line: int, product: str, relevant: tuple[str, ...]) -> EvalQuestion:
    return EvalQuestion(line=line, item=f"f:{line}", id=f"q{line}", question=f"question {line}",
                        relevant=relevant, product=product)


def test_aggregation_per_product_and_overall() -> None:
    results = [
        QuestionResult.of(_q(1, "P", ("r1", "r2")), RANKING),    # hit@5, MRR 0.25, nDCG 0.468451
        QuestionResult.of(_q(2, "P", ("z",)), ["z", "a"]),       # all 1
        QuestionResult.of(_q(3, "Q", ("z",)), ["a", "b"]),       # a miss: all 0
        QuestionResult.of(_q(4, NO_PRODUCT, ("z",)), ["a", "z"]),  # rank 2: hit@3, MRR 0.5, nDCG 0.630930
    ]
    report = EvalReport.build("f", 10, results)
    assert list(report.products) == ["P", "Q", NO_PRODUCT]  # sorted, "(none)" last
    p = report.products["P"]
    assert p["n"] == 2
    assert (p["hit@1"], p["hit@3"], p["hit@5"], p["hit@10"]) == (0.5, 0.5, 1.0, 1.0)
    assert p["mrr@10"] == pytest.approx((0.25 + 1) / 2)
    assert p["ndcg@10"] == pytest.approx((0.468451 + 1) / 2, abs=1e-6)
    assert report.products["Q"] == {"n": 1, **{m: 0.0 for m in METRICS}}
    o = report.overall
    assert o["n"] == 4
    # hit@1: q2 only; hit@3: q2, q4; hit@5 and hit@10: q1, q2, q4.
    assert (o["hit@1"], o["hit@3"], o["hit@5"], o["hit@10"]) == (0.25, 0.5, 0.75, 0.75)
    assert o["mrr@10"] == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)  # 0.4375
    assert o["ndcg@10"] == pytest.approx((0.468451 + 1 + 0 + 0.630930) / 4, abs=1e-6)  # 0.524845
    first = report.to_dict()["questions"][0]
    assert {k: first[k] for k in ("id", "question", "relevant", "retrieved", "first_rank")} == {
        "id": "q1", "question": "question 1", "relevant": ["r1", "r2"], "retrieved": RANKING, "first_rank": 4}
    assert report.to_dict()["questions"][2]["first_rank"] is None
    empty = EvalReport.build("f", 10, [])
    assert empty.overall == {"n": 0, **{m: None for m in METRICS}} and empty.products == {}


def test_report_round_trip_and_comparison(tmp_path: Path) -> None:
    results = [QuestionResult.of(_q(1, "P", ("z",)), ["a", "z"]), QuestionResult.of(_q(2, "Q", ("z",)), ["z"])]
    report = EvalReport.build("f", 10, results, [EvalError(3, "f:3", "missing field 'source_url'")],
                              {"model": "m"})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report.to_dict()), encoding="utf-8")
    loaded = load_report(path)
    assert loaded.to_dict() == report.to_dict()

    same = compare(report, loaded)
    assert same.same_questions
    assert all(v == 0 for v in same.overall.values())
    assert all(v == 0 for row in same.products.values() for v in row.values())

    # Now q1 is found first and q3 (a new product) joins; P improves, Q is unchanged.
    better = EvalReport.build("f", 10, [QuestionResult.of(_q(1, "P", ("z",)), ["z"]), results[1],
                                        QuestionResult.of(_q(3, "R", ("z",)), ["a"])])
    diff = compare(better, report, previous_name="before.json")
    assert diff.previous == "before.json"
    assert (diff.same_questions, diff.added_questions, diff.removed_questions) == (False, 1, 0)
    assert diff.products["P"]["hit@1"] == 1.0 and diff.products["P"]["mrr@10"] == 0.5
    assert all(v == 0 for v in diff.products["Q"].values())
    assert set(diff.products["R"].values()) == {None}, "a product only one report has: nothing to compare"
    assert diff.overall["n"] == 1
    assert diff.overall["hit@1"] == pytest.approx(2 / 3 - 1 / 2)

    path.write_text('{"not": "a report"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a ragq eval report"):
        load_report(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not JSON"):
        load_report(path)


# --- eval lines -----------------------------------------------------------------------


def test_eval_lines_use_query_accept_url_lists_and_report_bad_lines(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "question": "Q?", "query": "Billing: Q?", "source_url": "u1", "product": "Billing"},
        {"id": "b", "question": "Only a question", "source_url": ["u2", "u3", "u2"]},
        "{not json",
        "",
        {"id": "c", "query": "no page"},
        {"id": "d", "question": "x", "source_url": 7},
        {"id": "e", "question": "x", "source_url": []},
        {"id": "f", "question": "x", "source_url": "u", "product": 3},
        {"id": "a", "question": "again", "source_url": "u"},
        {"id": "g", "query": 5, "question": "x", "source_url": "u"},
        {"id": "h", "source_url": "u"},
        {"id": "i", "question": "x" * 9000, "source_url": "u"},
        ["not", "an", "object"],
        {"question": "no id: the line number is the id", "source_url": " u4 "},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                               for x in lines).encode("utf-8"))
    parsed = list(read_eval_file(path))
    good = [p for p in parsed if isinstance(p, EvalQuestion)]
    bad = {p.line: p.reason for p in parsed if isinstance(p, EvalError)}
    assert [(q.line, q.id, q.question, q.relevant, q.product) for q in good] == [
        (1, "a", "Billing: Q?", ("u1",), "Billing"),
        (2, "b", "Only a question", ("u2", "u3"), NO_PRODUCT),
        (14, "14", "no id: the line number is the id", ("u4",), NO_PRODUCT),
    ]
    assert good[0].item == f"{path}:1"
    assert bad[3].startswith("malformed JSON")
    assert 4 not in bad, "a blank line is skipped (but counted)"
    assert bad[5] == "missing field 'source_url' (the page that answers the question)"
    assert bad[6] == "field 'source_url' must be a string or a list of strings, got number"
    assert bad[7] == "field 'source_url' is an empty list"
    assert bad[8] == "field 'product' must be a string, got number"
    assert bad[9] == "duplicate id 'a' (first used at line 1)"
    assert bad[10] == "field 'query' must be a string, got number"
    assert bad[11] == "missing field 'question' (or 'query')"
    assert bad[12] == "question is 9000 characters, over the 8000 limit"  # the question job's own rule
    assert bad[13] == "expected a JSON object, got array"
    assert sorted(bad) == [3, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    # Python objects go through the same rules.
    assert [type(p) for p in read_eval_lines([{"question": "q", "source_url": "u"}, {"question": "q"}])] == [
        EvalQuestion, EvalError]


def test_shared_dev_questions_parse_cleanly() -> None:
    data = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    files = [data / "jdcloud-en" / "questions-dev.jsonl", data / "jdcloud-cn" / "questions-dev.jsonl"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"the dev questions are not under {data}")
    for f in files:
        parsed = list(read_eval_file(f))
        errors = [p for p in parsed if isinstance(p, EvalError)]
        assert parsed and not errors, errors[:3]
        raw = [json.loads(line) for line in f.open(encoding="utf-8")]
        assert [p.question for p in parsed] == [r.get("query") or r["question"] for r in raw]


def test_evaluate_refuses_a_shallow_top_k(redis_url: str, tmp_path: Path) -> None:
    client = Client(Stack(redis_url, tmp_path).settings())
    with pytest.raises(RagqError, match="top_k must be between 10 and 100"):
        client.evaluate([], top_k=5)


# --- end to end -------------------------------------------------------------------------

#: Twelve small pages, three per product: more than 10, so the @10 figures can miss.
DOCS = {
    "Compute": [
        ("Reset the root password of a virtual machine",
         "To reset the root password of a virtual machine, stop the instance, open the console, choose "
         "Reset Password, enter the new password twice and start the instance again."),
        ("Resize a virtual machine",
         "A virtual machine can change its instance type: stop it, choose Change Configuration and pick "
         "more CPU cores or memory. The new size applies when the instance starts."),
        ("Virtual machine images",
         "Create a private image from a running instance to launch identical virtual machines later. "
         "Images can be shared with other accounts in the same region."),
    ],
    "Billing": [
        ("Request an invoice",
         "Invoices are requested in the billing center: open Invoice Management, select the paid orders "
         "and submit the invoice request. Paper invoices are posted within seven days."),
        ("Pay-as-you-go billing",
         "Pay-as-you-go resources are billed every hour for what they used in that hour. Charges are "
         "deducted from the account balance."),
        ("Overdue payments",
         "When the account balance is negative, resources are stopped after 24 hours and deleted after "
         "seven days unless the account is topped up."),
    ],
    "Storage": [
        ("Create a snapshot of a cloud disk",
         "A snapshot keeps a point-in-time copy of a cloud disk. Create it in the console under Snapshots; "
         "a disk can be rolled back to any of its snapshots."),
        ("Detach a cloud disk",
         "To detach a cloud disk, unmount its file system inside the instance first, then choose Detach in "
         "the console. Its data is kept."),
        ("Object storage buckets",
         "Object storage keeps files in buckets. A bucket name is unique in a region and may be public or "
         "private; files are reached over HTTP."),
    ],
    "Network": [
        ("Elastic IP addresses",
         "An elastic IP is a public address that can move between instances. Bind it to an instance's "
         "network interface and release it when it is no longer needed."),
        ("Security groups",
         "Security groups are virtual firewalls: rules allow inbound or outbound traffic by protocol, port "
         "and source address. Traffic no rule allows is dropped."),
        ("Load balancer listeners",
         "A load balancer listener receives traffic on a port and forwards it to backend instances, "
         "checking their health every few seconds."),
    ],
}


def url_of(product: str, n: int) -> str:
    return f"https://docs.example.com/{product.lower()}/page-{n}"


QUESTIONS: list[dict | str] = [
    {"id": "vm-password", "question": "How do I reset the root password?",
     "query": "Compute: How do I reset the root password of a virtual machine?",
     "source_url": url_of("Compute", 0), "product": "Compute"},
    # Two relevant pages, one of which is not in the store: nDCG@10 can reach 1/(1 + 1/log2 3) at most.
    {"id": "invoice", "question": "How can I get an invoice for what I paid?",
     "source_url": [url_of("Billing", 0), "https://docs.example.com/billing/not-ingested"], "product": "Billing"},
    {"id": "bad", "question": "Which page answers me?", "product": "Billing"},  # line 3: no source_url
    "",                                                                           # line 4: blank
    "{\"id\": \"broken\", ",                                                       # line 5: malformed
    {"id": "copy", "query": "Storage: how do I keep a copy of my disk's data?",
     "source_url": url_of("Storage", 0), "product": "Storage"},
    {"id": "firewall", "query": "Which traffic reaches my instances?",
     "source_url": url_of("Network", 1), "product": "Network"},
    # Its page was never ingested: a miss at every depth, and no product.
    {"id": "missing", "question": "How do I rotate access keys?", "source_url": "https://docs.example.com/iam/keys"},
]
GOOD = [q for q in QUESTIONS if isinstance(q, dict) and "source_url" in q]


def expected_figures(ranking: list[str], relevant: list[str]) -> dict:
    """The formulas again, written out independently of common.evaluation."""
    rel = set(relevant)
    first = next((i + 1 for i, url in enumerate(ranking) if url in rel), None)
    dcg, counted = 0.0, set()
    for i, url in enumerate(ranking[:10]):
        if url in rel and url not in counted:
            dcg += 1 / math.log2(i + 2)
            counted.add(url)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10)))
    return {"first_rank": first,
            **{f"hit@{k}": float(first is not None and first <= k) for k in (1, 3, 5, 10)},
            "mrr@10": 1 / first if first and first <= 10 else 0.0, "ndcg@10": dcg / idcg}


def mean_rows(rows: list[dict]) -> dict:
    return {"n": len(rows), **{m: sum(r[m] for r in rows) / len(rows) for m in METRICS}}


@pytest.fixture(scope="module")
def ingested(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    root = tmp_path_factory.mktemp("eval-docs")
    for product, pages in DOCS.items():
        for n, (title, content) in enumerate(pages):
            doc = {"title": title, "content": content, "product": product, "url": url_of(product, n)}
            (root / f"{product.lower()}-{n}.json").write_text(json.dumps(doc), encoding="utf-8")
    job = json.loads(stack.cli("ingest", str(root), "--wait", "--json", check=True).stdout)
    assert (job["status"], job["completed"]) == ("completed", 12)
    return stack


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """The body of a Rich table: each row's label and its lines of cells (a figure, then its change)."""
    rows: dict[str, list[list[str]]] = {}
    label = ""
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        first, *cells = [c.strip() for c in line.strip("│").split("│")]
        if first:
            label = first
            rows[label] = []
        rows[label].append(cells)
    return rows


def assert_close(actual: dict, expected: dict) -> None:
    assert actual["n"] == expected["n"]
    for m in METRICS:
        assert actual[m] == pytest.approx(expected[m], abs=1e-9), m


def test_ragq_eval_through_the_queue_matches_search_rankings(ingested: Stack, tmp_path: Path) -> None:
    stack = ingested
    path = tmp_path / "eval.jsonl"
    path.write_text("".join((q if isinstance(q, str) else json.dumps(q)) + "\n" for q in QUESTIONS), encoding="utf-8")
    saved = tmp_path / "out" / "report.json"
    result = stack.cli("eval", str(path), "--json", "--output", str(saved))
    assert result.returncode == 1, result.stderr  # two bad lines
    report = json.loads(result.stdout)
    assert json.loads(saved.read_text(encoding="utf-8")) == report

    # The bad lines, by line number and reason; the rest was measured.
    assert [(e["line"], e["item"], e["reason"]) for e in report["errors"]] == [
        (3, f"{path}:3", "missing field 'source_url' (the page that answers the question)"),
        (5, f"{path}:5", "malformed JSON: Expecting property name enclosed in double quotes at column 17"),
    ]
    stderr = "".join(result.stderr.split())  # Rich folds long lines, even inside a path
    assert f"{path}:3:missingfield'source_url'" in stderr and "evaluated5questions,2linesnotevaluated" in stderr
    assert report["top_k"] == 10 and report["meta"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"

    # The same queries through `ragq search --json --top-k 10`, and the figures by hand.
    expected_rows: dict[str, list[dict]] = {}
    by_id = {q["id"]: q for q in report["questions"]}
    assert list(by_id) == [q["id"] for q in GOOD]
    for q in GOOD:
        text = q.get("query") or q["question"]
        hits = json.loads(stack.cli("search", text, "--json", "--top-k", "10", check=True).stdout)
        ranking = [h["url"] for h in hits]
        assert len(ranking) == 10 == len(set(ranking)), "ten distinct documents"
        relevant = q["source_url"] if isinstance(q["source_url"], list) else [q["source_url"]]
        want = expected_figures(ranking, relevant)
        got = by_id[q["id"]]
        assert (got["question"], got["relevant"], got["retrieved"]) == (text, relevant, ranking)
        assert got["first_rank"] == want["first_rank"]
        assert got["metrics"] == pytest.approx({m: want[m] for m in METRICS}, abs=1e-9)
        expected_rows.setdefault(q.get("product") or "(none)", []).append(want)
        print(q["id"], "first relevant at", want["first_rank"], {m: round(want[m], 4) for m in METRICS})

    assert list(report["products"]) == ["Billing", "Compute", "Network", "Storage", "(none)"]
    for product, rows in expected_rows.items():
        assert_close(report["products"][product], mean_rows(rows))
    assert_close(report["overall"], mean_rows([r for rows in expected_rows.values() for r in rows]))
    print("overall", {k: round(v, 4) for k, v in report["overall"].items()})
    # What needs no model to know: a page that was never ingested is never found, and a
    # question whose second page is missing cannot score a perfect nDCG.
    assert by_id["missing"]["first_rank"] is None and set(by_id["missing"]["metrics"].values()) == {0.0}
    assert by_id["invoice"]["metrics"]["ndcg@10"] <= 1 / (1 + 1 / math.log2(3)) + 1e-9
    assert by_id["vm-password"]["first_rank"] == 1, "a query that restates a page's title finds it first"

    # Against the saved report: every delta is zero, in the JSON and in the table.
    again = stack.cli("eval", str(path), "--json", "--compare", str(saved))
    assert again.returncode == 1, again.stderr
    comparison = json.loads(again.stdout)["comparison"]
    assert comparison["same_questions"] and comparison["previous"] == str(saved)
    assert all(v == 0 for v in comparison["overall"].values())
    assert all(v == 0 for row in comparison["products"].values() for v in row.values())

    table = stack.cli("eval", str(path), "--compare", str(saved))
    assert table.returncode == 1, table.stderr
    rows = table_rows(table.stdout)
    assert list(rows) == ["Billing", "Compute", "Network", "Storage", "(none)", "overall"], table.stdout
    o = report["overall"]
    assert rows["overall"] == [[str(o["n"]), *(f"{o[m]:.3f}" for m in METRICS)], ["±0"] * 7]


def test_client_evaluate_takes_lines_and_agrees_with_the_cli(ingested: Stack, tmp_path: Path) -> None:
    client = Client(ingested.settings())
    seen: list[str] = []
    report = client.evaluate(GOOD, on_progress=lambda info: seen.append(info.status), timeout=120)
    assert report.ok and report.overall["n"] == len(GOOD) and seen[-1] == "completed"
    assert report.meta["job_id"] and client.job(report.meta["job_id"]).refresh().total == len(GOOD)

    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in GOOD), encoding="utf-8")
    result = ingested.cli("eval", str(path), "--json", "--top-k", "12")
    assert result.returncode == 0, result.stderr
    deeper = json.loads(result.stdout)
    assert deeper["top_k"] == 12 and all(len(q["retrieved"]) == 12 for q in deeper["questions"])
    # Two more documents retrieved change nothing at depth 10.
    assert_close(deeper["overall"], report.overall)

    shallow = ingested.cli("eval", str(path), "--top-k", "5")
    assert shallow.returncode == 2
    missing = ingested.cli("eval", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "nope.jsonl" in "".join(missing.stderr.split())
    bad_previous = ingested.cli("eval", str(path), "--compare", str(path))
    assert bad_previous.returncode == 2 and "--compare" in bad_previous.stderr
