"""Parameter traffic of a real fit, as an observer on the path sees it: the tasks are pointed
at a recording TCP proxy in front of the parameter server (psEncryption='on' and 'off')."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from pyspark.ml.linalg import Vectors

import sparktorch._driver as driver
from recording_proxy import RecordingProxy
from sparktorch import SparkTorch, serialize_torch_obj
from sparktorch.errors import ParamError

pytestmark = pytest.mark.timeout(240)

WEIGHT = np.float32(1234.5678)


class _ViaProxy:
    """The fit's server, except that its address (what the tasks are told) is the proxy's."""

    def __init__(self, server, proxy: RecordingProxy) -> None:
        self._server, self._proxy = server, proxy

    @property
    def address(self):
        return ("127.0.0.1", self._proxy.port)

    def __getattr__(self, name):
        return getattr(self._server, name)


def fit_through_a_proxy(spark, monkeypatch, encryption: str) -> tuple[bytes, nn.Module]:
    proxies = []
    start = driver._start_server

    def start_behind_proxy(*args, **kwargs):
        server = start(*args, **kwargs)
        proxies.append(RecordingProxy(server.address))
        return _ViaProxy(server, proxies[-1])

    monkeypatch.setattr(driver, "_start_server", start_behind_proxy)
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.fill_(float(WEIGHT))
        net.bias.fill_(float(WEIGHT))
    rows = [(Vectors.dense([float(i % 3), 1.0, 0.0, -1.0]), float(i % 3)) for i in range(16)]
    df = spark.sparkContext.parallelize(rows, 2).toDF(["features", "label"])
    obj = serialize_torch_obj(net, nn.CrossEntropyLoss(), torch.optim.SGD, lr=1e-6)
    fitted = SparkTorch(
        inputCol="features", labelCol="label", torchObj=obj, iters=3, partitions=2, psEncryption=encryption
    ).fit(df)
    proxies[0].close()
    assert proxies[0].connections == 2, "every task went through the proxy"
    return proxies[0].recorded(), fitted.getPytorchModel()


def test_with_ps_encryption_on_a_fit_shows_no_parameter_values_on_the_wire(spark, monkeypatch):
    needle = np.full(4, WEIGHT, "<f4").tobytes()
    # The control: the same fit in plaintext shows the weights to the observer.
    plain, _ = fit_through_a_proxy(spark, monkeypatch, "off")
    assert needle in plain
    wire, model = fit_through_a_proxy(spark, monkeypatch, "on")
    assert len(wire) > 0 and needle not in wire and b"SPT1" not in wire
    # ...and training went through the encrypted channel.
    assert np.allclose(model.weight.detach().numpy(), WEIGHT, atol=1e-2)


def test_auto_encrypts_when_sparks_rpc_encryption_is_on(spark, monkeypatch):
    # The shared session was started without RPC encryption; the fit reads Spark's conf as a
    # session started with spark.network.crypto.enabled=true would report it.
    from pyspark import SparkContext

    real = SparkContext.getConf

    def conf_with_rpc_encryption(self):
        conf = real(self)
        conf.set("spark.network.crypto.enabled", "true")
        return conf

    monkeypatch.setattr(SparkContext, "getConf", conf_with_rpc_encryption)
    wire, _ = fit_through_a_proxy(spark, monkeypatch, "auto")
    assert len(wire) > 0
    assert np.full(4, WEIGHT, "<f4").tobytes() not in wire and b"SPT1" not in wire


def test_ps_encryption_is_validated_before_any_job(spark):
    df = spark.createDataFrame([(Vectors.dense([1.0]), 0.0)], ["features", "label"])
    obj = serialize_torch_obj(nn.Linear(1, 1), nn.MSELoss(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ParamError, match="psEncryption"):
        SparkTorch(torchObj=obj, psEncryption="maybe").fit(df)
