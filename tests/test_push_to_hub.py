"""`LCADPipeline.push_to_hub` uploads the whole folder (weights, code files) with the L-CAD model card."""

import pytest

import lcad_pipeline.pipeline_lcad as pipeline_module
from lcad_pipeline import LCADPipeline
from tiny_models import make_tiny_pipeline


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what would be uploaded instead of reaching the Hub."""
    uploads = {}

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"

    def upload_folder(self, folder, repo_id, **kwargs):
        from pathlib import Path

        uploads["repo_id"] = repo_id
        uploads["files"] = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        uploads["card"] = (Path(folder) / "README.md").read_text()
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(pipeline_module, "create_repo", lambda repo_id, **kwargs: Repo(repo_id))
    monkeypatch.setattr(LCADPipeline, "_upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_code_and_the_folders_card(tmp_path, fake_hub):
    folder = tmp_path / "lcad"
    make_tiny_pipeline().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# L-CAD test card\n")

    pipe = LCADPipeline.from_pretrained(folder)
    url = pipe.push_to_hub("lcad-test")
    assert url.startswith("https://huggingface.co/me/lcad-test")
    assert fake_hub["repo_id"] == "me/lcad-test"
    assert "# L-CAD test card" in fake_hub["card"]
    for needed in ("model_index.json", "pipeline.py", "unet/lcad_pipeline.py", "vae/lcad_pipeline.py", "README.md"):
        assert needed in fake_hub["files"], needed
    assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in fake_hub["files"])

    # Saving again keeps the card; an explicit card wins.
    pipe.save_pretrained(tmp_path / "again")
    assert "# L-CAD test card" in (tmp_path / "again" / "README.md").read_text()
    pipe.push_to_hub("me/other", model_card="# another card\n")
    assert fake_hub["card"] == "# another card\n" and fake_hub["repo_id"] == "me/other"
