from amoeba_profile.core.entry import Entry
from amoeba_profile.core.subnet import LayerShape, Subnet


def test_labels_are_for_people(tiny_arch):
    assert Entry("attn", "prefill", 1, 128, 0, 32, 4).label == "attn prefill 128 tok, 32 heads (4 kv)"
    assert Entry("attn", "decode", 2, 1, 512, 8, 4).label == "attn decode @512 b2, 8 heads (4 kv)"
    assert Entry("mlp", "decode", 1, 1, 0, ffn=96).label == "mlp decode, ffn 96"
    assert Entry("base", "decode", 1, 1, 256).label == "base decode @256"
    assert Entry("model", "decode", 1, 1, 512).label == "model L0 decode @512"
    uniform = Subnet.uniform(tiny_arch, 3, 0.75)
    assert Entry("model", "decode", 1, 1, 512, subnet=uniform).label == "model L3 w3/4 decode @512"
    fitted = Subnet(tiny_arch, (LayerShape(0, 4, 2, 128), LayerShape(3, 4, 2, 128)))
    assert Entry("model", "prefill", 1, 16, 0, subnet=fitted).label == "model L2 4h ffn 128 prefill 16 tok"
    mixed = Subnet(tiny_arch, (LayerShape(0, 4, 2, 128), LayerShape(3, 8, 4, 128)))
    assert (
        Entry("model", "prefill", 1, 16, 0, subnet=mixed).label == f"model L2 per-layer {mixed.id[:6]} prefill 16 tok"
    )


def test_one_row_key_for_entries_rows_and_fit_residuals(tiny_arch, tmp_path):
    """Entry.key, the key of its written (and re-read) row and the fit's residual keys are one formatter's."""
    from amoeba_profile.core.timing import Measurement
    from amoeba_profile.table.fit import fit_rows
    from amoeba_profile.table.lut import entry_key_of_row, frame_rows, load_table, measured_row, rows_frame, write_table

    entries = [Entry("model", "decode", 1, 1, 64, subnet=Subnet.uniform(tiny_arch, depth, 1.0)) for depth in (1, 2, 3)]
    rows = [
        measured_row(
            e, Measurement.from_samples([1.0 + depth, 1.1 + depth]), "ok", method="whole", repeat=1, wall_s=0.0
        )
        for depth, e in enumerate(entries, start=1)
    ]
    path = tmp_path / "t.csv"
    write_table(path, rows_frame(rows), {"arch": tiny_arch.to_dict()})
    frame = load_table(path).frame
    reread = frame_rows(frame)
    assert [e.key for e in entries] == [r.key for r in rows] == [r.key for r in reread]
    assert [entry_key_of_row(r) for _, r in frame.iterrows()] == [r.key for r in reread]
    _, residuals, _ = fit_rows(reread, {e.subnet_id for e in entries})
    assert set(residuals) == {e.key for e in entries}
