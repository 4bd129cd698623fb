"""Model card and `lcad push`: what is uploaded, and clear failures offline (no network is used here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_models import make_tiny_pipeline

from lcad_pipeline import hub
from lcad_pipeline.cli import main as lcad_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "lcad-tiny"
    make_tiny_pipeline().save_pretrained(path)
    hub.write_model_card(path, license="cc-by-nc-4.0", converted_from="coco_weight.ckpt", repo_id="someone/lcad-coco")
    return path


def _header(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


def test_template_is_the_repository_model_card():
    assert hub.find_model_card_template() == ROOT / "model_card.md"
    text = (ROOT / "model_card.md").read_text()
    assert "{{ card_data }}" in text


def test_wheel_ships_the_template_where_the_installed_package_finds_it(tmp_path, monkeypatch):
    # A non-editable install has no repository root beside the package: the wheel carries model_card.md as a data
    # file (<prefix>/share/lcad_pipeline/), and find_model_card_template looks there.
    import subprocess
    import sys
    import sysconfig
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(tmp_path)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lcad_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = [n for n in archive.namelist() if n.endswith(".data/data/share/lcad_pipeline/model_card.md")]
        assert len(shipped) == 1
        template = archive.read(shipped[0])
    assert template == (ROOT / "model_card.md").read_bytes()

    # installed layout: the package alone in site-packages, the template under the environment's data path
    site, data = tmp_path / "site-packages" / "lcad_pipeline", tmp_path / "prefix"
    site.mkdir(parents=True)
    (data / "share" / "lcad_pipeline").mkdir(parents=True)
    (data / "share" / "lcad_pipeline" / "model_card.md").write_bytes(template)
    monkeypatch.setattr(hub, "__file__", str(site / "hub.py"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(data) if name == "data" else None)
    assert hub.find_model_card_template() == data / "share" / "lcad_pipeline" / "model_card.md"
    card = hub.render_model_card(license="cc-by-nc-4.0")
    assert "L-CAD" in str(card)


def test_rendered_card(folder):
    text = (folder / "README.md").read_text()
    header = _header(text)
    assert header["library_name"] == "diffusers"
    assert header["pipeline_tag"] == "image-to-image"
    assert header["license"] == "cc-by-nc-4.0"
    assert header["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"lcad", "colorization"} <= set(header["tags"])
    # both loading routes, the idea, limitations, the licence in words, the citation
    assert 'LCADPipeline.from_pretrained("someone/lcad-coco")' in text
    assert 'custom_pipeline="someone/lcad-coco"' in text and "trust_remote_code=True" in text
    assert "## Any-level descriptions" in text and "## Limitations" in text
    assert "coco_weight.ckpt" in text and "extended COCO-Stuff" in text
    assert "CC BY-NC 4.0" in text and "@inproceedings{chang2023lcad" in text
    assert "{{" not in text and "{%" not in text and "{#" not in text


def test_upload_file_list(folder):
    (folder / ".cache").mkdir(exist_ok=True)
    (folder / ".cache" / "junk").write_text("x")
    files = hub.upload_file_list(folder)
    for expected in (
        "model_index.json",
        "README.md",
        "pipeline.py",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "unet/lcad_pipeline.py",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/lcad_pipeline.py",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ):
        assert expected in files, expected
    assert not any(f.startswith(".") or "__pycache__" in f for f in files)
    assert all((folder / f).is_file() for f in files)


def test_incomplete_folder_is_refused(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "README.md").unlink()
    (broken / "vae" / "lcad_pipeline.py").unlink()
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(hub.HubError) as error:
        hub.upload_file_list(broken)
    for missing in ("README.md", "vae/lcad_pipeline.py", "unet/ weights"):
        assert missing in str(error.value)
    with pytest.raises(hub.HubError, match="model_index.json"):
        hub.upload_file_list(tmp_path)


def test_push_offline_fails_clearly(folder, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = lcad_main(["push", str(folder), "someone/lcad-coco"])
    err = capsys.readouterr().err
    assert status == 2
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err


class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, or fails like an unreachable Hub."""

    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        files = sorted(
            p.relative_to(kwargs["folder_path"]).as_posix()
            for p in Path(kwargs["folder_path"]).rglob("*")
            if p.is_file()
        )
        self.calls.append(("upload_folder", kwargs, files, (Path(kwargs["folder_path"]) / "README.md").read_text()))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.calls = []
    _FakeApi.fail_with = None
    return _FakeApi


def test_push_uploads_the_whole_folder(folder, fake_hub, capsys):
    status = lcad_main(["push", str(folder), "someone/lcad-coco", "--private", "--token", "hf_x"])
    assert status == 0, capsys.readouterr().err
    (_, repo_id, create_kwargs), (_, upload, _, _) = fake_hub.calls
    assert repo_id == "someone/lcad-coco" and create_kwargs["private"] is True
    assert upload["repo_id"] == "someone/lcad-coco" and Path(upload["folder_path"]) == folder
    assert upload["allow_patterns"] == hub.upload_file_list(folder)
    assert "commit/abc" in capsys.readouterr().err


def test_push_network_failure_is_a_message(folder, fake_hub, capsys):
    import httpx

    fake_hub.fail_with = httpx.ConnectError("[Errno -2] Name or service not known")
    status = lcad_main(["push", str(folder), "someone/lcad-coco"])
    err = capsys.readouterr().err
    assert status == 2 and "cannot reach the Hugging Face Hub" in err and "Traceback" not in err


def test_push_pipeline_includes_code_and_card(folder, fake_hub):
    from lcad_pipeline import LCADPipeline

    pipe = LCADPipeline.from_pretrained(folder)
    url = hub.push_pipeline(pipe, "someone/lcad-coco", commit_message="first upload", max_shard_size="1GB")
    assert url.endswith("commit/abc")
    (_, upload, files, readme) = fake_hub.calls[-1]
    assert upload["commit_message"] == "first upload"
    assert {"pipeline.py", "unet/lcad_pipeline.py", "vae/lcad_pipeline.py", "README.md", "model_index.json"} <= set(
        files
    )
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert readme == (folder / "README.md").read_text()  # the card of the folder it was loaded from


def test_push_pipeline_built_in_memory_gets_the_template_card(fake_hub):
    hub.push_pipeline(make_tiny_pipeline(), "someone/lcad-tiny")
    readme = fake_hub.calls[-1][3]
    header = _header(readme)
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "image-to-image"
    assert 'LCADPipeline.from_pretrained("someone/lcad-tiny")' in readme
