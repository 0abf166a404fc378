"""Files a user got from someone else are data: opening them with llmfast runs no code from them. An audit on
2026-12-07 (model folders' own code and pickles are tests/test_model_folders.py's, and through every loader
tests/test_untrusted_loaders.py's) found two ways in, both fixed:
a chain recipe's `launch:` was any command line (`launch: [sh, -c, ...]` ran it), and a `--config` file given to
`llmfast serve` after `--` could set vLLM's trust-remote-code (the folder's configuration_*.py ran) or a flag that
imports a class or a plugin file by name. Also fixed: a `datasets` folder's image column made reading its rows fetch
the URL it named, and a tokenizer_config.json beside a .gguf file ran its auto_map code on a 'y'."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from llmfast.errors import UserError

TEXT = REPO / "eval" / "text" / "persuasion.txt"
CODE = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("llmfast: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _chain(tmp_path: Path, model: Path, launch: list[str]) -> Path:
    stage = {"type": "eval", "launch": launch, "with": {"model": str(model), "eval": {"perplexity": {
        "text": str(TEXT), "max_tokens": 64, "context": 32, "stride": 32}}}}
    path = tmp_path / "chain.yaml"
    path.write_text(json.dumps({"output": str(tmp_path / "run"), "stages": {"ev": stage}}))
    return path


def _launches(tmp_path: Path, mark: Path) -> dict[str, list[str]]:
    script = tmp_path / "evil.py"
    script.write_text(CODE.format(mark=str(mark)))
    fake = tmp_path / "bin" / "torchrun"  # a 'torchrun' the recipe brings along
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + CODE.format(mark=str(mark)))
    fake.chmod(0o755)
    shell = f"echo ran > {mark}"
    return {"shell": ["sh", "-c", shell, "sh"],
            "torchrun-no-python": ["torchrun", "--standalone", "--no-python", "sh", "-c", shell, "sh"],
            "torchrun-script": ["torchrun", "--standalone", str(script)],
            "torchrun-module": ["torchrun", "--standalone", "-m", "evil"],
            "brought-along": [str(fake)]}


@pytest.mark.parametrize("case", ["shell", "torchrun-no-python", "torchrun-script", "torchrun-module",
                                  "brought-along"])
def test_a_chain_recipes_launch_runs_only_a_launcher_of_llmfast(tiny_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Fixed: `launch:` was run as it stood (`llmfast run` then said the stage succeeded); now it is torchrun or
    `accelerate launch` starting `-m llmfast.cli`, checked with the launcher's own parser before anything runs."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)  # `-m evil` would import ./evil.py
    mark = tmp_path / "RAN"
    launch = _launches(tmp_path, mark)[case]
    code, _, err = run_cli("run", str(_chain(tmp_path, tiny_dir, launch)))
    assert not mark.exists(), err
    _one_line(code, err, "stage ev (eval)", "launch:")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("launch", "needle"), [
    (["accelerate", "launch", "--config_file", "a.yaml"], "--config_file is not taken from a chain recipe"),
    (["accelerate", "launch", "--tpu_cluster"], "--tpu_cluster is not taken"),
    (["accelerate", "launch", "--env", "LD_PRELOAD=x.so"], "--env is not taken"),
    (["accelerate", "launch", "--no-python"], "--no_python is not taken"),
    (["accelerate", "config"], "`accelerate launch ...` only"),
    (["accelerate", "launch", "train.py"], "a script or module of its own (train.py)"),
    (["torchrun", "--run-path"], "--run-path is not taken"),
    (["torchrun", "--nproc_per_node"], "its parser refuses it"),
    (["python3", "-m", "torch.distributed.run"], "under torchrun or accelerate only")])
def test_launch_words_that_run_or_read_something_else_are_refused(launch: list[str], needle: str) -> None:
    from llmfast.chain.launchers import check_launch

    with pytest.raises(UserError, match="launch: ") as e:
        check_launch(launch)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("launch", [
    [], ["torchrun", "--standalone", "--nproc_per_node", "2"], ["torchrun", "--nnodes=2", "--rdzv-backend", "c10d",
                                                                "--rdzv-endpoint", "host:29400"],
    [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"],
    ["accelerate", "launch", "--multi_gpu", "--num_processes", "8"],
    ["accelerate", "launch", "--cpu", "--num_processes", "2", "--use_fsdp", "--fsdp_offload_params", "true"]])
def test_launchers_as_the_docs_give_them_pass(launch: list[str]) -> None:
    from llmfast.chain.launchers import check_launch

    check_launch(launch)


@pytest.fixture(scope="module")
def code_folder(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The tiny model with its own Python code beside model_type llama (which transformers alone never imports)."""
    w = tmp_path_factory.mktemp("untrusted")
    folder = Path(shutil.copytree(tiny_dir, w / "code-known"))
    for f in ("configuration_x.py", "modeling_x.py"):
        (folder / f).write_text(CODE.format(mark=str(w / "RAN")))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_vllm_config_file_cannot_turn_on_remote_code(code_folder: Path, tmp_path: Path) -> None:
    """Fixed: `llmfast serve DIR -- --config FILE` with `trust-remote-code: true` in FILE started vLLM with it, which
    imported DIR's configuration_x.py."""
    config = tmp_path / "vllm.yaml"
    config.write_text("trust-remote-code: true\n")
    code, _, err = run_cli("serve", str(code_folder), "--port", "0", "--", "--config", str(config))
    assert not (code_folder.parent / "RAN").exists(), err
    _one_line(code, err, "--trust-remote-code", "never runs a model folder's own code")


@pytest.mark.parametrize(("flags", "needle"), [
    (["--trust-remote-code"], "--trust-remote-code"), (["--trust_remote"], "--trust-remote-code"),
    (["--config", "{d}/a.yaml"], "--trust-remote-code"),
    (["--config", "{d}/b.yaml"], "sets worker-extension-cls, which loads code"),
    (["--config", "{d}/c.yaml"], "sets tool-parser-plugin, which loads code"),
    (["--config", "{d}/d.yaml"], "sets load-format")])
def test_vllm_flags_that_load_code_from_a_file_are_refused(tmp_path: Path, flags: list[str], needle: str) -> None:
    from llmfast.serve.vllm_flags import parse

    for name, text in (("a", "trust_remote_code: true"), ("b", "worker-extension-cls: evil.Ext"),
                       ("c", "tool-parser-plugin: ./evil.py"), ("d", "load-format: pt")):
        (tmp_path / f"{name}.yaml").write_text(text + "\n")
    with pytest.raises(UserError, match="the vLLM flags after --") as e:
        parse([f.format(d=tmp_path) for f in flags])
    assert needle in str(e.value)


def test_vllm_flags_given_on_the_command_line_or_harmless_in_a_file_pass(tmp_path: Path) -> None:
    from llmfast.serve.vllm_flags import parse

    (tmp_path / "ok.yaml").write_text("max-num-seqs: 4\nload-format: auto\n")
    assert parse(["--config", str(tmp_path / "ok.yaml")])[0].max_num_seqs == 4
    assert parse(["--worker-extension-cls", "mine.Ext"])[0].worker_extension_cls == "mine.Ext"


def test_a_datasets_folders_media_column_is_never_fetched_or_decoded(tmp_path: Path) -> None:
    """Fixed: a `datasets` folder with an Image column (dataset_info.json says which) made every read of its rows
    fetch the URL the column names (an HTTP request to wherever the folder's maker chose; a local path was opened)
    and fail with a traceback. Rows are read as stored: the chat, and the column's own values, untouched."""
    import http.server
    import threading

    import datasets

    from llmfast.data.jsonl import read_rows

    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/leak.png"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "img": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}})
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"messages": [chat], "img": [{"bytes": None, "path": url}]}, features=features) \
        .save_to_disk(str(folder))
    info = json.loads((folder / "dataset_info.json").read_text())
    info["features"]["img"] = {"_type": "Image"}  # the same Arrow type: datasets takes the file's word for it
    (folder / "dataset_info.json").write_text(json.dumps(info))
    try:
        rows = read_rows(folder)
    finally:
        server.shutdown()
    assert asked == []
    assert rows == [{"messages": chat, "img": {"bytes": None, "path": url}, "_row": 0}]


def test_a_gguf_beside_a_tokenizer_config_naming_code_runs_none(tiny_dir: Path, tmp_path: Path) -> None:
    """Fixed: transformers reads a GGUF's tokenizer from its folder too, and a tokenizer_config.json there whose
    auto_map names a .py (a Downloads folder, a repo of several formats) was run on a 'y' at its prompt:
    `echo y | llmfast models --prepare FILE.gguf` imported it. Now one line, before anything is converted."""
    import subprocess

    from test_models import _write_llama_gguf

    folder = tmp_path / "dl"
    folder.mkdir()
    _write_llama_gguf(tiny_dir, folder / "m.gguf")
    mark = tmp_path / "RAN"
    (folder / "tokenization_x.py").write_text(CODE.format(mark=str(mark)))
    auto_map = {"AutoTokenizer": ["tokenization_x.XTok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XTokenizer", "auto_map": auto_map}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFAST_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "llmfast", "models", "--prepare", str(folder / "m.gguf")], input="y\n",
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert not mark.exists(), p.stderr[-1000:]
    _one_line(p.returncode, p.stderr, "tokenizer_config.json (tokenizer_class 'XTokenizer') names the model's own Python "
              "code", "move m.gguf to a folder of its own")
    assert "[y/N]" not in p.stdout + p.stderr and not (tmp_path / "cache" / "models").exists()
