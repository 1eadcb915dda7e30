"""The CLI answers at once: `interp --help` and `--version` import neither torch nor transformers, and every
argument of every command has help."""
import subprocess
import sys

from interp.cli import parser


def test_help_and_version_do_not_load_torch():
    code = ("import sys\nfrom interp.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'probes', 'viz') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: interp" in out.stdout and "heavy: []" in out.stdout, out.stdout + out.stderr
    v = subprocess.run([sys.executable, "-m", "interp.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert v.stdout.strip().startswith("interp ")


def test_every_argument_has_help():
    ap = parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.dest != "help":
                assert a.help, f"interp {name}: {a.dest} has no help"


def test_scan_help_lists_the_registered_analyses(capsys):
    from interp.cli import main
    try:
        main(["scan", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for name in ("sinks", "induction", "dla", "routes", "patching", "atp", "vhd"):
        assert f"  {name} " in out, name
