"""The HTTP API over real sockets on 127.0.0.1: validation, size limit, auth, headers."""
import json

import httpx
from labeling_helpers import ThreadServer, write_source
import pytest

from rlhf_jax.labeling.__main__ import main
from rlhf_jax.labeling.client import LabelingClient, LabelingHTTPError
from rlhf_jax.labeling.records import load_sources
from rlhf_jax.labeling.server import create_app, read_tokens, serve
from rlhf_jax.labeling.store import LabelStore

TOKENS = {"ann-token-0123456789": "ann", "bob-token-0123456789": "bob"}


@pytest.fixture
def server(tmp_path):
    write_source(tmp_path / "src", n_train=6, n_eval=2, k=3,
                 special={1: "<script>alert(1)</script>"})
    store = LabelStore(tmp_path / "labels.sqlite", labels_per_item=2)
    load_sources(store, tmp_path / "src")
    with ThreadServer(create_app(store)) as srv:
        srv.store = store
        yield srv
    store.close()


def post(srv, path, body, who="ann", **kw):
    headers = {"X-Labeler": who, **kw.pop("headers", {})}
    if not isinstance(body, (bytes, str)) and body is not None and "content" not in kw:
        kw["json"] = body
    elif body is not None:
        kw["content"] = body
        headers.setdefault("Content-Type", "application/json")
    return httpx.post(srv.url + path, headers=headers, timeout=10, trust_env=False, **kw)


def get(srv, path, who="ann", **kw):
    headers = {"X-Labeler": who} if who else {}
    headers.update(kw.pop("headers", {}))
    return httpx.get(srv.url + path, headers=headers, timeout=10, trust_env=False, **kw)


def test_next_hides_policies_and_gold(server):
    r = get(server, "/api/next")
    assert r.status_code == 200
    view = r.json()["item"]
    assert set(view) == {"item", "id", "split", "prompt", "responses", "k", "lease_expires_at",
                         "draft"}
    assert "policy" not in r.text and "gold" not in r.text
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("body, status, message", [
    ({"item": "ITEM", "ranks": [0, "x", 1], "submission_id": "abcdefgh"}, 422,
     "ranks[1]: Input should be a valid integer (got 'x')"),
    ({"item": "ITEM", "ranks": [0, True, 1], "submission_id": "abcdefgh"}, 422,
     "ranks[1]: Input should be a valid integer"),
    ({"item": "ITEM", "ranks": [0, 1, 2]}, 422, "submission_id: Field required"),
    ({"item": "ITEM", "ranks": [0, 1, 2], "submission_id": "short"}, 422,
     "submission_id: String should match pattern"),
    ({"item": "ITEM", "ranks": [0, 1, 2], "submission_id": "abcdefgh", "labeler": "bob"}, 422,
     "labeler: Extra inputs are not permitted"),
    ({"item": "ITEM", "ranks": [0, 1], "submission_id": "abcdefgh"}, 422,
     "expected 3 ranks (one per response), got 2"),
    ({"item": "ITEM", "ranks": [0, 3, 1], "submission_id": "abcdefgh"}, 422,
     "ranks[1]: expected a rank in [0, 3) (0 = best), got 3"),
    ({"item": "ITEM", "ranks": [0, 2, 2], "submission_id": "abcdefgh"}, 422, "skip rank 1"),
    ({"item": 999, "ranks": [0, 1, 2], "submission_id": "abcdefgh"}, 404, "item 999: no such"),
    ({"item": "OTHER", "ranks": [0, 1, 2], "submission_id": "abcdefgh"}, 409,
     "is not leased to you"),
    (b'{"item": 1, "ranks": [0, 1', 422, "JSON decode error"),
    (b'[1, 2, 3]', 422, "body: Input should be a valid dictionary"),
])
def test_invalid_submissions_get_4xx_with_a_clear_message(server, body, status, message):
    item = get(server, "/api/next").json()["item"]["item"]
    other = get(server, "/api/next", who="bob").json()["item"]["item"]
    other = get(server, "/api/next", who="cid").json()["item"]["item"] if other == item else other
    assert other != item
    if isinstance(body, dict):
        body = {k: {"ITEM": item, "OTHER": other}.get(v, v) if k == "item" else v
                for k, v in body.items()}
    r = post(server, "/api/submit", body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert server.store.labels() == []


def test_body_size_limit(server):
    item = get(server, "/api/next").json()["item"]["item"]
    big = json.dumps({"item": item, "ranks": [0, 1, 2], "submission_id": "abcdefgh",
                      "pad": "x" * (64 * 1024)})
    r = post(server, "/api/submit", big)
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts the bytes as they arrive
        yield big[:1000].encode()
        for i in range(1000, len(big), 4096):
            yield big[i:i + 4096].encode()

    r = post(server, "/api/submit", None, content=chunks(),
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    small = json.dumps({"item": item, "ranks": [0, 1, 2], "submission_id": "abcdefgh",
                        "pad": "x" * (60 * 1024)})
    r = post(server, "/api/submit", small)  # under the limit: parsed, then refused as invalid
    assert r.status_code == 422 and "pad: Extra inputs" in r.json()["detail"]
    assert server.store.labels() == []


def test_who_is_asking(server):
    r = get(server, "/api/next", who=None)
    assert r.status_code == 401 and "X-Labeler" in r.json()["detail"]
    r = get(server, "/api/next", who="ann smith")
    assert r.status_code == 400 and "labeler name" in r.json()["detail"]
    r = get(server, "/api/next", headers={"Host": "attacker.example:80"})
    assert r.status_code == 400 and "Host header" in r.json()["detail"]
    r = get(server, "/api/next", headers={"Host": f"localhost:{server.port}"})
    assert r.status_code == 200


def test_page_is_served_with_a_strict_content_security_policy(server):
    r = get(server, "/", who=None)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/static/app.js"' in r.text
    js = get(server, "/static/app.js", who=None)
    assert js.status_code == 200 and "innerHTML" not in js.text
    assert "innerHTML" not in get(server, "/static/agreement.js", who=None).text
    assert get(server, "/agreement", who=None).status_code == 200
    assert get(server, "/api/config", who=None).json()["auth"] == "name"


def test_submit_skip_undo_over_http(server):
    with LabelingClient(server.url, labeler="ann") as ann:
        st = ann.next()
        first = st["item"]
        res = ann.submit(first["item"], [0, 1, 1], "http-sub-0001")
        again = ann.submit(first["item"], [0, 1, 1], "http-sub-0001")  # a retry
        assert not res["result"]["duplicate"] and again["result"]["duplicate"]
        assert again["state"]["progress"]["mine"] == 1
        nxt = again["state"]["item"]
        assert nxt["item"] != first["item"]
        skipped = ann.skip(nxt["item"])
        assert skipped["state"]["progress"]["my_skips"] == 1
        undone = ann.undo("http-sub-0001")
        assert undone["state"]["item"]["item"] == first["item"]
        assert undone["state"]["item"]["draft"] == [0, 1, 1]
        with pytest.raises(LabelingHTTPError) as e:
            ann.undo("http-sub-0001")
        assert e.value.status == 404
        assert ann.agreement()["labelers"][0]["skips"] == 1
    assert server.store.labels() == []


def test_tokens_are_required_and_name_the_labeler(tmp_path):
    write_source(tmp_path / "src", n_train=3, n_eval=1)
    store = LabelStore(tmp_path / "db.sqlite")
    load_sources(store, tmp_path / "src")
    with ThreadServer(create_app(store, tokens=TOKENS, allowed_hosts=None)) as srv:
        assert get(srv, "/api/config", who=None).json()["auth"] == "token"
        r = get(srv, "/api/next")  # a name is not enough
        assert r.status_code == 401 and "token" in r.json()["detail"]
        r = get(srv, "/api/next", who=None, headers={"Authorization": "Bearer wrong-token-xyz"})
        assert r.status_code == 401
        r = get(srv, "/api/next", who="bob",
                headers={"Authorization": "Bearer ann-token-0123456789"})
        assert r.status_code == 200 and r.json()["progress"]["labeler"] == "ann"
        with LabelingClient(srv.url, token="bob-token-0123456789") as bob:
            assert bob.next()["progress"]["labeler"] == "bob"
        r = get(srv, "/api/next", who=None, headers={"Host": "labeling.lan:8765",
                                                     "Authorization": "Bearer "
                                                     "ann-token-0123456789"})
        assert r.status_code == 200  # network servers answer any Host name; tokens guard them
    store.close()


def test_non_loopback_host_needs_tokens(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite")
    with pytest.raises(ValueError, match="pass --tokens-file"):
        serve(store, host="0.0.0.0", port=1)
    with pytest.raises(SystemExit, match="pass --tokens-file"):
        main(["serve", str(tmp_path), "--host", "192.168.1.20", "--db", str(tmp_path / "x")])
    store.close()


def test_read_tokens(tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("# comment\nann ann-token-0123456789\n\nbob bob-token-0123456789  # two\n")
    assert read_tokens(f) == TOKENS
    for text, message in [("ann\n", r"tokens.txt:1: expected '<labeler> <token>'"),
                          ("ann short\n", r"tokens.txt:1: token of ann: expected 16-256"),
                          ("a/b ann-token-0123456789\n", r"tokens.txt:1: labeler name"),
                          ("ann ann-token-0123456789\nann bob-token-0123456789\n",
                           r"tokens.txt:2: labeler 'ann' already has a token \(line 1\)"),
                          ("ann ann-token-0123456789\nbob ann-token-0123456789\n",
                           r"tokens.txt:2: token of bob repeats the token of ann"),
                          ("# nothing\n", "no tokens")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_tokens(f)


def test_tokens_command_writes_a_private_file(tmp_path, capsys):
    out = tmp_path / "tokens.txt"
    assert main(["tokens", "ann", "bob", "--out", str(out), "--url", "http://10.0.0.5:8765"]) == 0
    tokens = read_tokens(out)
    assert sorted(tokens.values()) == ["ann", "bob"]
    assert out.stat().st_mode & 0o077 == 0
    links = capsys.readouterr().out
    assert all(f"http://10.0.0.5:8765/?token={t}" in links for t in tokens)
    with pytest.raises(SystemExit, match="exists"):
        main(["tokens", "cid", "--out", str(out)])
