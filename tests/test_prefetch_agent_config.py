"""The agent's prefetch classifier (issue 11), without a kernel: config
prefetch.model and --prefetch-model, the classifier built from them, the
check before anything is attached, a reload that cannot change it, and
what status shows of it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging

import pytest
from test_daemon_logic import FixedModel, RecordingNotifier, fake_agent
from test_prefetch_unit import _status_lines

from iobridge import cli
from iobridge.core import decision, resources
from iobridge.core.model import ModelCheckError
from iobridge.core.prefetch_model import LearnedClassifier
from iobridge.core.prefetch_rules import RuleClassifier
from iobridge.daemon import agent as daemon
from iobridge.daemon import config
from iobridge.daemon import prefetch as P
from iobridge.daemon.config import ConfigError

SHIPPED = resources.data_dir("models") / "prefetch-default.onnx"


def write(tmp_path, text):
    p = tmp_path / "iobridge.toml"
    p.write_text(text)
    return p


# ------------------------------------------------------------ config

def test_the_default_is_the_shipped_prefetch_model():
    cfg = config.load(None)
    assert cfg.prefetch_model == config.DEFAULT_PREFETCH_MODEL == SHIPPED
    assert SHIPPED.is_file() and not cfg.prefetch_rules
    on = config.load(None).replace(prefetch_mode="on")   # validated: the file is there
    assert on.prefetch_model == SHIPPED


def test_a_relative_model_path_is_to_the_config_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "p.onnx").write_bytes(b"x")
    cfg = config.load(write(tmp_path, '[prefetch]\nmode = "on"\nmodel = "m/p.onnx"\n'))
    assert cfg.prefetch_model == (tmp_path / "m" / "p.onnx").resolve()
    assert cfg.prefetch_model.is_absolute()


def test_rules_selects_the_rule_based_classifier(tmp_path):
    cfg = config.load(write(tmp_path, '[prefetch]\nmode = "shadow"\nmodel = "rules"\n'))
    assert cfg.prefetch_model == "rules" and cfg.prefetch_rules


@pytest.mark.parametrize("text, match", [
    ('model = "prefetch.pt"\n', r"prefetch\.model = 'prefetch\.pt' is invalid: it must be the "
                                r"path of an \.onnx prefetch model or \"rules\""),
    ("model = 3\n", r"prefetch\.model = 3 is invalid"),
    ('model = "Rules"\n', r"prefetch\.model = 'Rules' is invalid"),
    ('model = ""\n', r"prefetch\.model = '' is invalid"),
    ('mode = "on"\nmodel = "nothere.onnx"\n', r"prefetch\.model = '.*nothere\.onnx': no such file"),
    ('mode = "shadow"\nmodel = "nothere.onnx"\n', r"prefetch\.model = .*: no such file"),
])
def test_bad_values_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, "[prefetch]\n" + text))


def test_a_missing_model_is_no_error_while_prefetch_is_off(tmp_path):
    cfg = config.load(write(tmp_path, '[prefetch]\nmodel = "nothere.onnx"\n'))
    assert cfg.prefetch_mode == "off" and cfg.prefetch_model == (tmp_path / "nothere.onnx")
    with pytest.raises(ConfigError, match=r"command line: prefetch\.model = .*: no such file"):
        cfg.replace(prefetch_mode="on")


def test_the_file_key_is_model_not_prefetch_model(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key prefetch\.prefetch_model"):
        config.load(write(tmp_path, '[prefetch]\nprefetch_model = "rules"\n'))


# ------------------------------------------------------------ command line

def parse(*argv):
    return cli.build_parser().parse_args(["run", *argv])


def test_prefetch_model_option_overrides_the_config(tmp_path, monkeypatch):
    assert parse().prefetch_model is None
    assert "prefetch_model" not in daemon.run_overrides(parse())
    assert daemon.run_overrides(parse("--prefetch-model", "rules"))["prefetch_model"] == "rules"
    (tmp_path / "p.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    over = daemon.run_overrides(parse("--prefetch", "on", "--prefetch-model", "p.onnx"))
    assert over["prefetch_model"] == tmp_path / "p.onnx" and over["prefetch_mode"] == "on"
    cfg = config.load(write(tmp_path, '[prefetch]\nmodel = "rules"\n')).replace(**over)
    assert cfg.prefetch_model == tmp_path / "p.onnx" and cfg.prefetch_mode == "on"


def test_prefetch_model_option_help_says_default_and_rules(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--prefetch-model PATH|rules" in text
    assert "models/prefetch-default.onnx" in text and "'rules' for the rule-based" in text


@pytest.mark.parametrize("argv, match", [
    (["--prefetch-model", "x.pt"], r"command line: prefetch\.model = '.*x\.pt' is invalid"),
    (["--prefetch", "on", "--prefetch-model", "none.onnx"],
     r"command line: prefetch\.model = '.*none\.onnx': no such file"),
])
def test_a_bad_prefetch_model_option_is_one_line_and_exit_1(argv, match, capsys, tmp_path,
                                                            monkeypatch):
    """Refused with the config, before root or anything else is needed."""
    import re
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *argv]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------ the classifier

def test_the_classifier_is_learned_for_a_path_and_rules_for_rules():
    learned = P.classifier_for(SHIPPED)
    assert isinstance(learned, LearnedClassifier) and learned.path == SHIPPED
    card = json.loads((SHIPPED.parent / "prefetch-default.card.json").read_text())
    assert learned.sha256 == card["model_sha256"]
    assert P.classifier_info(learned) == {"name": "learned:prefetch-default.onnx",
                                          "path": str(SHIPPED), "sha256": card["model_sha256"]}
    rules = P.classifier_for("rules")
    assert isinstance(rules, RuleClassifier)
    assert P.classifier_info(rules) == {"name": "kml-rules", "path": None, "sha256": None}


def test_an_admission_model_is_a_model_of_the_wrong_kind():
    with pytest.raises(ModelCheckError, match="model of the wrong kind: an admission model"):
        P.classifier_for(config.DEFAULT_MODEL)


def test_start_loads_the_classifier_prefetch_says(tmp_path):
    off = config.Config()
    assert daemon.Agent._load_models(off)[2] is None
    _, maker, c = daemon.Agent._load_models(config.Config(prefetch_mode="shadow"))
    assert isinstance(c, LearnedClassifier) and isinstance(maker, decision.TableMaker)
    c = daemon.Agent._load_models(config.Config(prefetch_mode="on", prefetch_model="rules"))[2]
    assert isinstance(c, RuleClassifier)


class Fakes:
    """Stand-ins for what start() acquires, recording what it did."""

    def __init__(self, monkeypatch):
        from iobridge.kernel import bpf, dmtarget, observer, pins, route_policy, system
        self.calls = []
        for mod, name in ((system, "require_root"), (system, "require_bpf_kernel"),
                          (bpf, "check_header_version"), (dmtarget, "check_module_version")):
            monkeypatch.setattr(mod, name, lambda *a, **k: None)
        monkeypatch.setattr(daemon, "discover", lambda names: self.calls.append("discover") or [])
        fakes = self

        class Thing:
            def __init__(self, *a, **k):
                fakes.calls.append(type(self).__name__)

            def open(self):
                return self

            load = open

            def leg_features(self):
                return self

            def __getattr__(self, name):
                fakes.calls.append(name)
                return lambda *a, **k: {}

        for mod, name in ((observer, "BlockObserver"), (route_policy, "RoutePolicy"),
                          (pins, "Pins")):
            monkeypatch.setattr(mod, name, type(name, (Thing,), {}))


def test_a_wrong_kind_model_stops_the_start_before_anything(monkeypatch, tmp_path):
    fakes = Fakes(monkeypatch)
    cfg = config.Config(status_file=tmp_path / "s.json", prefetch_mode="on",
                        prefetch_model=config.DEFAULT_MODEL)
    agent = daemon.Agent(cfg, notifier=RecordingNotifier())
    with pytest.raises(ModelCheckError, match="model of the wrong kind"):
        agent.start()
    assert fakes.calls == []              # the quick check: not even a target listing
    agent.stop()


def test_a_broken_model_stops_the_start_before_anything_is_attached(monkeypatch, tmp_path):
    """A card that matches its file passes the quick check; the full check
    (on the thread, while BCC compiles) refuses it before Pins or attach."""
    fakes = Fakes(monkeypatch)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    card = json.loads((SHIPPED.parent / "prefetch-default.card.json").read_text())
    card["model_sha256"] = hashlib.sha256(bad.read_bytes()).hexdigest()
    (tmp_path / "broken.card.json").write_text(json.dumps(card))
    cfg = config.Config(status_file=tmp_path / "s.json", prefetch_mode="on", prefetch_model=bad)
    agent = daemon.Agent(cfg, notifier=RecordingNotifier())
    with pytest.raises(ModelCheckError, match="not an ONNX model"):
        agent.start()
    assert "Pins" not in fakes.calls and "attach" not in fakes.calls
    assert agent.prefetch is None and agent.prefetch_classifier is None
    agent.stop()


# ------------------------------------------------------------ reload, status

def test_a_reload_keeps_the_prefetch_model_as_started(caplog):
    agent = fake_agent(prefetch_model="rules")
    agent.notify = RecordingNotifier()
    done = concurrent.futures.Future()
    done.set_result((agent.cfg.replace(prefetch_model=config.DEFAULT_PREFETCH_MODEL),
                     FixedModel([0.1]), decision.TableMaker(FixedModel([0.1]))))
    with caplog.at_level(logging.WARNING, logger="iobridge.agent"):
        assert agent._apply_reload(done)
    assert agent.cfg.prefetch_model == "rules"
    assert "take effect at restart only (prefetch: mode, window_s, state_file, model, device_only)" \
        in caplog.text


def test_status_shows_the_classifier(tmp_path):
    learned = P.classifier_for(SHIPPED)
    unit = P.PrefetchUnit(None, learned, "on", tmp_path / "state.json")
    pf = {"running": True, **unit.status()}
    assert pf["classifier_info"]["sha256"] == learned.sha256
    assert pf["counters"]["classified"] == 0
    json.dumps(pf)                        # the status file's prefetch part
    assert f"  classifier learned:prefetch-default.onnx: model {SHIPPED} (sha256 " \
           f"{learned.sha256[:12]}); 0 stream windows classified" in _status_lines(daemon, pf)
    rules = P.PrefetchUnit(None, RuleClassifier(), "shadow", tmp_path / "state.json")
    pf = {"running": True, **rules.status()}
    assert "  classifier kml-rules: rule-based (prefetch.model = rules); 0 stream windows " \
           "classified" in _status_lines(daemon, pf)


def test_classified_counts_the_classifiers_decisions_not_forced_ones():
    dec = P.Decider(RuleClassifier())
    seq = P.Window(7, (300.0, 25.0, 25.1, 1.0, 0.25), 1.0, insertions=300)
    few = P.Window(8, (3.0, 1.0, 1.0, 1.0, 0.25), 1.0, insertions=3)
    dec.decide({7: seq, 8: few, 9: seq}, {}, {7: 128, 8: 128, 9: 128}, force={9: "random"})
    assert dec.classified == 1 and dec.streams[7].cls == "sequential"
    assert dec.streams[8].cls is None and dec.streams[9].cls == "random"
