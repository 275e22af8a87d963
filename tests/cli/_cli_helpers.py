"""Running `normgrad.cli.main` in-process for the CLI tests."""

import json

from normgrad import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


def assert_usage_error(capsys, *argv, match=None):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    if match is not None:
        assert match in err, err
    return err
