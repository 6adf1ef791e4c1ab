"""lazylog.Logger: the named logger, reached on first use, records naming the real caller."""

import logging

from supervisor import lazylog


def _where_logged(log):
    log.debug("a debug line %d", 1)
    log.warning("a warning")


def test_records_go_to_the_named_logger_and_name_the_caller(caplog):
    log = lazylog.Logger("supervisor.test-lazylog")
    with caplog.at_level(logging.DEBUG, logger="supervisor.test-lazylog"):
        _where_logged(log)
        assert log.isEnabledFor(logging.DEBUG)
    assert [(r.name, r.levelname, r.getMessage(), r.funcName) for r in caplog.records] == [
        ("supervisor.test-lazylog", "DEBUG", "a debug line 1", "_where_logged"),
        ("supervisor.test-lazylog", "WARNING", "a warning", "_where_logged")]


def test_a_pending_set_up_is_applied_by_the_first_record(monkeypatch):
    # (logging is imported here already: configure_when_used then configures at once)
    calls = []
    monkeypatch.setattr(lazylog, "configure", calls.append)
    lazylog.configure_when_used(True)
    assert calls == [True]
    monkeypatch.setattr(lazylog, "_pending", False)
    lazylog.Logger("supervisor.test-lazylog").warning("shown")
    assert calls == [True, False] and lazylog._pending is None
