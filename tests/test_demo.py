"""The demo's training loop runs end to end and reports the loss going down."""

from lime import demo


def test_demo_lowers_the_loss(capsys):
    assert demo.main(["--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "LiME summary" in printed and "Routing parameters" in printed
    assert "(down)" in printed
