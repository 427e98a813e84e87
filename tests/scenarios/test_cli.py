"""The `headmaster` command as a user runs it: serve, classify, zero-shot into a live server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from headmaster.client import HeadmasterClient
from tests.helpers import ARTIFACTS, Ports, clone_repo, free_port, run_cli, serve_command, start_server


def assert_clean_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.server  # runs `headmaster serve` / starts Triton itself
def test_serve_refuses_a_taken_port(repo, tmp_path):
    repo = clone_repo(repo, tmp_path / "repo")  # the session's repository is served already: a clone is not
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = run_cli("serve", "--repo", repo, *Ports(taken, free_port(), free_port()).options())
    assert_clean_error(result, f"port {taken} (http) is already in use on 127.0.0.1")


@pytest.mark.server  # runs `headmaster serve` / starts Triton itself
def test_serve_refuses_a_folder_that_is_not_a_repository(tmp_path):
    assert_clean_error(
        run_cli("serve", "--repo", tmp_path, *Ports.free().options()), "is not a Headmaster model repository"
    )


@pytest.mark.server  # runs `headmaster serve` / starts Triton itself
def test_serve_repairs_a_broken_config_and_says_so(repo, tmp_path):
    broken = clone_repo(repo, tmp_path / "repo")
    (broken / "classify" / "config.pbtxt").write_text("name: 'classify'\nmax_batch_size: lots\n")
    process = subprocess.Popen(serve_command(broken, Ports.free()), stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "Triton is ready" in line or len(lines) > 200:
                break
        printed = "".join(lines)
        assert "classify/config.pbtxt: not a valid config.pbtxt" in printed, printed
        assert "repaired:" in printed and "Triton is ready" in printed, printed
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0
    assert "max_batch_size: lots" not in (broken / "classify" / "config.pbtxt").read_text()


@pytest.mark.server  # runs `headmaster serve` / starts Triton itself
def test_serve_reports_why_triton_could_not_load_a_model(repo, tmp_path):
    broken = clone_repo(repo, tmp_path / "repo")
    (broken / "threshold" / "1" / "model.py").write_text("this is not python\n")
    result = run_cli("serve", "--repo", broken, *Ports.free().options(), "--startup-timeout", 120)
    # Triton exits 1 on a model that fails to load (now and then it crashes on the way out: -11).
    assert_clean_error(result, "tritonserver exited with code")
    assert "threshold" in result.stderr and "failed to load" in result.stderr


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def shm_mapped_by(pids: set[int]) -> set[str]:
    """The /dev/shm names these processes map: this server's regions, not those of another
    server running on the machine at the same time."""
    names = set()
    for pid in pids:
        try:
            maps = (Path("/proc") / str(pid) / "maps").read_text()
        except OSError:
            continue
        names |= {
            line.split("/dev/shm/", 1)[1].split(" (deleted)")[0].strip()
            for line in maps.splitlines()
            if "/dev/shm/" in line
        }
    return names


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.portable_only(
    "`headmaster serve` runs the bundled Triton (python backend only) and this counts a "
    "python stub per model; a native repository needs the onnxruntime backend"
)
@pytest.mark.server  # runs `headmaster serve`
def test_serve_stops_cleanly_on_sigterm(repo, tmp_path):
    repo = clone_repo(repo, tmp_path / "repo")  # the session's repository is served already: a clone is not
    shm_before = set(os.listdir("/dev/shm"))
    process = subprocess.Popen(serve_command(repo, Ports.free()), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "Triton is ready" in line or time.monotonic() > deadline:
                break
        assert any("Triton is ready" in line for line in seen), "".join(seen)
        server_tree = descendants(process.pid)
        assert len(server_tree) >= 8  # tritonserver + a python stub per model
        shm_during = (set(os.listdir("/dev/shm")) - shm_before) & shm_mapped_by(server_tree)
        assert shm_during, "the python backend keeps its tensors in /dev/shm"
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=90) == 0, rest
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped (tritonserver exit code 0)" in rest
    assert not [pid for pid in server_tree if alive(pid)], "processes outlived the server"
    assert not (shm_during & set(os.listdir("/dev/shm"))), "shared memory left in /dev/shm"


def test_classify_command_writes_jsonl_and_flags_bad_files(server, jpeg_photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in list(jpeg_photos)[:3]:
        (folder / name).write_bytes(jpeg_photos[name])
    (folder / "notes.jpg").write_text("this is a shopping list, not a photo")
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        output = tmp_path / f"{protocol}.jsonl"
        result = run_cli(
            "classify",
            folder,
            "--url",
            url,
            "--protocol",
            protocol,
            "--output",
            output,
            "--batch-size",
            2,
            "--embeddings",
        )
        assert result.returncode == 2, result.stderr  # some images failed
        assert "3 classified, 1 failed" in result.stderr
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(lines) == 4
        good = [line for line in lines if line["ok"]]
        bad = [line for line in lines if not line["ok"]]
        assert len(good) == 3 and all(set(line["heads"]) == {"animal", "has_cat"} for line in good)
        assert all(len(line["embedding"]) == 384 and len(line["sha256"]) == 64 for line in good)
        assert bad[0]["source"].endswith("notes.jpg") and "cannot identify" in bad[0]["error"]
        assert "animal:" in result.stdout


def test_classify_without_a_server_says_so(tmp_path, jpeg_photos):
    image = tmp_path / "a.jpg"
    image.write_bytes(next(iter(jpeg_photos.values())))
    result = run_cli("classify", image, "--url", f"127.0.0.1:{free_port()}")
    assert_clean_error(result, "no ready Headmaster server at")


@pytest.mark.server  # starts its own Triton
def test_zero_shot_head_hot_loads_into_a_running_server(repo, tmp_path, jpeg_photos):
    live_repo = clone_repo(repo, tmp_path / "repo")
    image = next(iter(jpeg_photos.values()))
    server = start_server(live_repo, ARTIFACTS / "zero-shot-live")
    try:
        with HeadmasterClient(server.grpc_url) as client:
            assert "vehicle" not in client.classify([image])[0].heads
            result = run_cli(
                "zero-shot",
                "vehicle",
                "--repo",
                live_repo,
                "--label",
                "car=a photo of a car",
                "--label",
                "bike=a photo of a bicycle",
                "--server",
                server.http_url,
            )
            assert result.returncode == 0, result.stderr
            assert re.search(r"head vehicle v1 \(zero-shot, logit scale [0-9.]+\): car, bike", result.stderr), (
                result.stderr
            )
            head = client.classify([image])[0].heads["vehicle"]
            assert (head.version, set(head.scores)) == (1, {"car", "bike"})
            result = run_cli(
                "zero-shot",
                "vehicle",
                "--repo",
                live_repo,
                "--label",
                "car=a photo of a car",
                "--label",
                "bike=a photo of a bicycle",
                "--label",
                "bus=a photo of a bus",
                "--server",
                server.http_url,
            )
            assert result.returncode == 0, result.stderr
            head = client.classify([image])[0].heads["vehicle"]
            assert (head.version, set(head.scores)) == (2, {"car", "bike", "bus"})
    finally:
        server.stop()
