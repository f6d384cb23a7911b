"""Problems shared by the test scripts that run in their own processes."""


def multihost_problem(devices=None):
    from gflow import data as D
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.sample(D.digits(), 64, seed=2)
    model = build_model("cnn", ds.input_shape, 10, width=4, depth=1, seed=1)
    return make_objective(model, ds, "ce", devices=devices)
