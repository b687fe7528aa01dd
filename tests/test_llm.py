"""The one LLM client (``nolabels.llm.ChatClient``) against a local HTTP server on
127.0.0.1: Retry-After honoured (seconds and HTTP-date), bounded retries then a one-line
error, client errors not retried, the key never in an error or a log record (even inside
the base URL), and both call sites (CODER's generator, LatteCLIP's captioner) use it."""
from __future__ import annotations

import email.utils
import http.server
import json
import logging
import sys
import threading
import time
import traceback

import pytest

pytest.importorskip("httpx")
pytest.importorskip("tenacity")

from nolabels import llm  # noqa: E402
from nolabels.errors import MissingDependencyError, NolabelsError  # noqa: E402

OK = (200, {}, {"choices": [{"message": {"role": "assistant", "content": "hello\nworld"}}]})


class Server:
    """Answers POSTs from a script of (status, headers, body); the last entry repeats.
    A body that is a dict is sent as JSON; ``echo`` sends back the request's path and
    Authorization header (a server that leaks what it got into its error page)."""

    def __init__(self, script: list, delay: float = 0.0):
        self.script, self.delay, self.requests = list(script), delay, []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "body": json.loads(body)})
                status, headers, payload = srv.script[min(len(srv.requests), len(srv.script)) - 1]
                if srv.delay:
                    time.sleep(srv.delay)
                if payload == "echo":
                    payload = f"bad gateway for {self.path} with {self.headers.get('Authorization')}"
                data = json.dumps(payload).encode() if isinstance(payload, dict) else payload.encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def make(script, delay=0.0):
        s = Server(script, delay)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv(llm.DEFAULT_API_KEY_ENV, raising=False)


def client(url, sleeps=None, **kw):
    kw.setdefault("api_key_env", None)
    return llm.ChatClient(url, "m", sleep=(sleeps.append if sleeps is not None else
                                           lambda s: None), **kw)


# ----------------------------------------------------------------------------- retries
def test_429_retry_after_seconds_is_waited(serve):
    s = serve([(429, {"Retry-After": "3"}, "slow down"), OK])
    sleeps = []
    c = client(s.url, sleeps)
    assert c.chat("hi", temperature=0.0, max_tokens=7) == "hello\nworld"
    assert sleeps == [3.0]  # the server's wait, not the backoff (1 s)
    assert len(s.requests) == 2 and c.requests == 2
    r = s.requests[-1]
    assert r["path"] == "/v1/chat/completions" and r["auth"] is None
    assert r["body"] == {"model": "m", "temperature": 0.0, "max_tokens": 7,
                         "messages": [{"role": "user", "content": "hi"}]}


def test_503_retry_after_http_date_is_waited(serve):
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    s = serve([(503, {"Retry-After": when}, "maintenance"), OK])
    sleeps = []
    assert client(s.url, sleeps).chat("hi") == "hello\nworld"
    assert len(sleeps) == 1 and 115 <= sleeps[0] <= 121


def test_parse_retry_after():
    now = 1_800_000_000.0
    assert llm.parse_retry_after("7") == 7.0
    assert llm.parse_retry_after(" 2.5 ") == 2.5
    assert llm.parse_retry_after("-4") == 0.0
    assert llm.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert llm.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert llm.parse_retry_after(bad) is None


def test_500_retried_up_to_the_limit_then_one_line_error(serve):
    s = serve([(500, {}, "internal\nerror\n  trace")])
    sleeps = []
    c = client(s.url, sleeps, max_attempts=3, backoff=0.5)
    with pytest.raises(llm.LLMError) as ei:
        c.chat("hi")
    assert len(s.requests) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff between the 3 attempts
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg == (f"chat endpoint {s.url}/chat/completions: no answer after 3 attempts: "
                   "HTTP 500: internal error trace")
    assert isinstance(ei.value, NolabelsError) and isinstance(ei.value, RuntimeError)


def test_client_error_is_not_retried(serve):
    s = serve([(404, {}, {"error": "no such model"})])
    sleeps = []
    with pytest.raises(llm.LLMError, match=r"HTTP 404: \{\"error\": \"no such model\"\}"):
        client(s.url, sleeps).chat("hi")
    assert len(s.requests) == 1 and sleeps == []


def test_retry_after_beyond_the_cap_is_not_waited(serve):
    s = serve([(429, {"Retry-After": "3600"}, "quota")])
    sleeps = []
    with pytest.raises(llm.LLMError, match="retry after 3600 s, more than 300 s"):
        client(s.url, sleeps).chat("hi")
    assert len(s.requests) == 1 and sleeps == []


def test_timeouts_and_unreachable_hosts_are_retried(serve):
    s = serve([OK], delay=1.0)
    sleeps = []
    with pytest.raises(llm.LLMError, match="no answer after 2 attempts: no answer within 0.2 s"):
        client(s.url, sleeps, max_attempts=2, timeout=0.2).chat("hi")
    assert sleeps == [1.0]
    with pytest.raises(llm.LLMError, match="no answer after 2 attempts: ConnectError"):
        client("http://127.0.0.1:9/v1", max_attempts=2, timeout=2).chat("hi")


def test_unexpected_answers_are_one_line_errors(serve):
    s = serve([(200, {}, "<html>not json</html>"), (200, {}, {"choices": []}),
               (200, {}, {"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}}]})])
    c = client(s.url)
    with pytest.raises(llm.LLMError, match="answer is not JSON"):
        c.chat("hi")
    with pytest.raises(llm.LLMError, match=r"no choices\[0\].message.content"):
        c.chat("hi")
    assert c.chat("hi") == "a b"  # content parts joined
    assert len(s.requests) == 3  # none of them retried


# ----------------------------------------------------------------------------- secrets
KEY = "sk-ENVKEY-0123456789"
PASSWORD = "PASSKEY-987654321"
QUERY_KEY = "QUERYKEY-5550123"


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc.args)


def test_key_from_the_environment_never_printed(serve, monkeypatch, caplog):
    monkeypatch.setenv("NL_TEST_KEY", KEY)
    s = serve([(502, {}, "echo")])  # the server leaks what it got into its error page
    url = f"http://user:{PASSWORD}@127.0.0.1:{s.port}/v1?api_key={QUERY_KEY}"
    caplog.set_level(logging.DEBUG)  # httpx logs every request URL at INFO
    c = llm.ChatClient(url, "m", api_key_env="NL_TEST_KEY", max_attempts=2,
                       sleep=lambda _s: None)
    with pytest.raises(llm.LLMError) as ei:
        c.chat("hi")
    # the key was sent (Bearer: the env key wins over the URL's credentials) and the
    # query string kept
    assert s.requests[0]["auth"] == f"Bearer {KEY}"
    assert s.requests[0]["path"] == f"/v1/chat/completions?api_key={QUERY_KEY}"
    text = _all_text(ei.value) + repr(c) + c.url
    records = "\n".join(r.getMessage() for r in caplog.records)
    assert "retry 1 of 1" in records and "HTTP Request" in records  # both loggers were heard
    for secret in (KEY, PASSWORD, QUERY_KEY):
        assert secret not in text, secret
        assert secret not in records, secret
    assert "***" in str(ei.value) and "HTTP 502" in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__context__ is None


def test_credentials_in_the_url_go_as_basic_auth_and_stay_hidden(serve, caplog):
    import base64

    s = serve([(401, {}, "echo")])
    caplog.set_level(logging.DEBUG)
    c = client(f"http://user:{PASSWORD}@127.0.0.1:{s.port}/v1")
    with pytest.raises(llm.LLMError, match="HTTP 401") as ei:
        c.chat("hi")
    basic = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    assert s.requests[0]["auth"] == f"Basic {basic}"
    text = _all_text(ei.value) + "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in text and basic not in text


def test_redact_and_url_secrets():
    url = f"https://me:{PASSWORD}@h.example/v1?model=x&api_key={QUERY_KEY}&token=tok-12345"
    found = llm.url_secrets(url)
    assert PASSWORD in found and QUERY_KEY in found and "tok-12345" in found
    assert "x" not in found
    assert llm.url_secrets(f"https://{KEY}@h.example/v1") == [KEY]
    shown = llm.redact(f"{url} and {KEY} quoted sk-ENVKEY-0123456789", [*found, KEY, None, "ab"])
    assert PASSWORD not in shown and QUERY_KEY not in shown and KEY not in shown
    assert "https://me:***@h.example/v1?model=x&api_key=***" in shown


# ----------------------------------------------------------------------------- setup
def test_missing_dependency_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenacity", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'nolabels\[llm\]'"):
        llm.ChatClient("http://127.0.0.1:9/v1", "m")


def test_bad_base_url():
    with pytest.raises(llm.LLMError, match="bad base URL"):
        llm.ChatClient(f"ftp://u:{PASSWORD}@h/v1", "m")
    try:
        llm.ChatClient(f"ftp://u:{PASSWORD}@h/v1", "m")
    except llm.LLMError as e:
        assert PASSWORD not in _all_text(e)


# ----------------------------------------------------------------------------- call sites
def test_both_call_sites_use_the_client(monkeypatch):
    from nolabels.methods import coder as C
    from nolabels.methods import latteclip as lc
    from PIL import Image

    sent = []

    def fake_post(self, payload):
        sent.append((self.model, payload))
        return {"choices": [{"message": {"content": "Kitty\n_Feline\n"}}]}

    monkeypatch.setattr(llm.ChatClient, "post", fake_post)
    monkeypatch.setenv("NL_TEST_KEY", KEY)
    gen = C.KnowledgeGenerator("http://127.0.0.1:9/v1", "gen-model", api_key_env="NL_TEST_KEY",
                               retries=5, temperature=0.3)
    assert isinstance(gen.client, llm.ChatClient) and gen.client.max_attempts == 5
    assert gen.synonyms("cat") == ["Kitty", "Feline"]
    cap = lc.VisionChatClient("http://127.0.0.1:9/v1", "cap-model", api_key_env="NL_TEST_KEY",
                              retries=2)
    assert isinstance(cap.client, llm.ChatClient) and cap.client.max_attempts == 3
    assert cap.describe([Image.new("RGB", (8, 8))], "describe") == "Kitty"
    (m1, p1), (m2, p2) = sent
    assert m1 == "gen-model" and p1["temperature"] == 0.3 and "synonyms" in str(p1["messages"])
    assert m2 == "cap-model" and p2["max_tokens"] == 77 and p2["temperature"] == 0.0
    parts = p2["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "describe"}
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert KEY not in repr(gen.client) + repr(cap.client)
    assert C.ChatError is llm.LLMError
