"""A secured cluster: tls:// scheduler addresses with distributed.Security, self-signed
certificates made here, a real LocalCluster listening with TLS on 127.0.0.1."""
from __future__ import annotations

import pytest

from conftest import cli_error, cli_json, moments
from padim_ooc.store import ModelStore

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(scheduler address, {ca, cert, key} PEM files, a folder); the cluster is closed at the end."""
    from distributed import LocalCluster
    from distributed.security import Security

    folder = tmp_path_factory.mktemp("tls")
    sec = Security.temporary()  # a self-signed CA and a certificate it signed, as PEM text
    files = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_client_cert), ("key", sec.tls_client_key)):
        files[name] = folder / f"{name}.pem"
        files[name].write_text(pem)
    secured = Security(tls_ca_file=str(files["ca"]), tls_client_cert=str(files["cert"]),
                       tls_client_key=str(files["key"]), tls_scheduler_cert=str(files["cert"]),
                       tls_scheduler_key=str(files["key"]), tls_worker_cert=str(files["cert"]),
                       tls_worker_key=str(files["key"]), require_encryption=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=secured, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        yield cluster.scheduler_address, files, folder


def _model(folder, name="m.zarr"):
    from conftest import CONFIG

    path = folder / name
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(6), [bytes([i]) * 16 for i in range(6)])
    return path


def test_finalize_on_a_tls_cluster_with_certificate_files(tls, tmp_path, capsys):
    address, files, _ = tls
    path = _model(tmp_path)
    out = cli_json(capsys, "finalize", path, "--scheduler", address, "--tls-ca-file", files["ca"],
                   "--tls-cert", files["cert"], "--tls-key", files["key"])
    assert out["finalized"] and ModelStore.open(path).attrs["finalized"]


def test_tls_certificates_from_dasks_configuration(tls, tmp_path, capsys):
    import dask

    address, files, _ = tls
    path = _model(tmp_path)
    with dask.config.set({"distributed.comm.tls.ca-file": str(files["ca"]),
                          "distributed.comm.tls.client.cert": str(files["cert"]),
                          "distributed.comm.tls.client.key": str(files["key"])}):
        assert cli_json(capsys, "finalize", path, "--scheduler", address)["finalized"]


def test_tls_without_certificates_is_one_line(tls, tmp_path, capsys):
    address, files, _ = tls
    path = _model(tmp_path)
    cli_error(capsys, "finalize", path, "--scheduler", address, text="no certificates are given")
    cli_error(capsys, "finalize", path, "--scheduler", address, "--tls-ca-file", files["ca"],
              text="missing --tls-cert, --tls-key")
    cli_error(capsys, "finalize", path, "--scheduler", address.replace("tls://", "tcp://"),
              "--tls-ca-file", files["ca"], "--tls-cert", files["cert"], "--tls-key", files["key"],
              text="TLS certificates are for a scheduler reached at tls://")


def test_a_certificate_from_another_authority_is_refused(tls, tmp_path, capsys, monkeypatch):
    from distributed.security import Security

    address, files, folder = tls
    other = Security.temporary()
    for name, pem in (("ca", other.tls_ca_file), ("cert", other.tls_client_cert), ("key", other.tls_client_key)):
        (tmp_path / f"{name}.pem").write_text(pem)
    monkeypatch.setenv("PADIM_OOC_CONNECT_TIMEOUT", "3")
    path = _model(tmp_path)
    cli_error(capsys, "finalize", path, "--scheduler", address, "--tls-ca-file", tmp_path / "ca.pem",
              "--tls-cert", tmp_path / "cert.pem", "--tls-key", tmp_path / "key.pem",
              text="cannot reach the Dask scheduler")
    assert not ModelStore.open(path).attrs["finalized"]


def test_a_local_clusters_dashboard_listens_on_127_0_0_1():
    from padim_ooc.parallel.client import open_client

    lines = []
    with open_client(workers=2, echo=lines.append) as client:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in info["workers"])
        sockets = client.cluster.scheduler.http_server._sockets.values()  # the dashboard's own sockets
        assert sockets and {s.getsockname()[0] for s in sockets} == {"127.0.0.1"}, \
            [s.getsockname() for s in sockets]
