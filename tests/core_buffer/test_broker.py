"""The broker helpers that need no broker: the URL as logs show it, and the reachability probe."""
import pytest

from core_buffer.broker import DEFAULT_URL, describe_url, reachable


@pytest.mark.parametrize("password", ["secret", "a/b#c?d", "p@ss", "x:y@z/w", "%2Fenc", "@", "##", "?/"])
@pytest.mark.parametrize("rest", ["127.0.0.1:5672/%2F", "broker.example.org/", "host:99999/%2F", "h"])
def test_describe_url_hides_every_password_and_keeps_user_and_host(password, rest):
    url = f"amqp://daq:{password}@{rest}"
    shown = describe_url(url)
    assert shown == f"amqp://daq:***@{rest}"
    assert password not in shown.replace("daq:***@", "")


@pytest.mark.parametrize("url,shown", [
    ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:***@127.0.0.1:5672/%2F"),
    ("amqps://u:p@host:5671/vh?heartbeat=10", "amqps://u:***@host:5671/vh?heartbeat=10"),
    ("amqp://127.0.0.1:5672/%2F", "amqp://127.0.0.1:5672/%2F"),  # no credentials: nothing to hide
    ("amqp://tokenwithoutcolon@host/", "amqp://***@host/"),  # credentials without ':' may be a token
    ("amqp://:pw@host/", "amqp://:***@host/"),
    ("u:p@host:5672", "u:***@host:5672"),  # no scheme
    ("", ""),
])
def test_describe_url_examples(url, shown):
    assert describe_url(url) == shown


def test_describe_url_of_the_default_hides_the_guest_password():
    assert describe_url(DEFAULT_URL) == "amqp://guest:***@127.0.0.1:5672/%2F"


@pytest.mark.parametrize("url", ["amqp://u:p@host:99999/", "amqp://u:a/b#c?d@127.0.0.1:5672/", "amqp://[::1"])
def test_reachable_says_no_for_urls_it_cannot_read_instead_of_raising(url):
    assert reachable(url, timeout_s=0.2) is False
