import torch

from slimkit.data import calibration_subset
from slimkit.quant.gptq import gptq_quantize
from slimkit.quant.ptq import StaticQuantConfig, quantize_static


def test_gptq_beats_round_to_nearest_on_the_layer_output_error():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(4096, 32, generator=g, dtype=torch.float64) @ mix.double()  # correlated inputs
    w = torch.randn(16, 32, generator=g)
    hessian = x.T @ x / len(x)
    qmax = 7
    scale = w.abs().amax(1) / qmax
    rtn = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None]
    gptq = gptq_quantize(w, hessian, scale[:, None].expand_as(w), qmax)
    codes = gptq / scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4

    def output_error(q):
        return float(((x @ (w - q).double().T) ** 2).mean())

    assert output_error(gptq) < 0.7 * output_error(rtn)


def test_gptq_in_static_quantization(digits, briefly_trained):
    model = briefly_trained("lenet5")
    calib = calibration_subset(digits, 256)
    rtn, _ = quantize_static(model.eval(), calib, StaticQuantConfig(weight_bits=3))
    gptq, step = quantize_static(model.eval(), calib, StaticQuantConfig(weight_bits=3, rounding="gptq"))
    assert step["rounding"] == "gptq"
    with torch.no_grad():
        ref = model(digits.x_test)
        err = {k: float(((m(digits.x_test) - ref) ** 2).mean()) for k, m in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < err["rtn"]


def test_bias_correction_removes_the_mean_output_shift():
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    calib = torch.rand(512, 1, 8, 8, generator=g) + 0.5  # a positive mean input makes rounding bias visible
    with torch.no_grad():
        reference = model(calib)
        shifts = {}
        for corrected in (False, True):
            quantized, _ = quantize_static(model, calib, StaticQuantConfig(weight_bits=3, bias_correction=corrected))
            shifts[corrected] = float((quantized(calib) - reference).mean(0).abs().mean())
    assert shifts[True] < 0.3 * shifts[False]
