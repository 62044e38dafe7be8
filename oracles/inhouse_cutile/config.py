"""The tuning of the in-house kernels: one frozen ``KernelConfig`` that ``forward.nsa_forward`` passes to every
entry point it calls. The defaults are the fastest configuration measured on the H100; ``compile_check`` builds
its kernel variants from such objects. No torch or cuTile import here."""
from __future__ import annotations

from dataclasses import dataclass


MIN_SEL_ROWS = 16  # the selection kernels pad the G heads of a group to at least this many rows (MMA minimum)


def pow2(x: int) -> int:
    """Smallest power of two >= x."""
    return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and pow2(x) == x


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes, loop lengths and cuTile occupancy hints of the in-house kernels."""

    cmp_tile: tuple[int, int] = (64, 64)
    """Compression kernel: (rows = queries x padded heads, pooled blocks per key tile)."""
    window_tile: tuple[int, int] = (64, 64)
    """Sliding-window kernel: (rows, keys per key tile); its rows also set the window + forced-local kernel's tile."""
    cmp_one_pass_tiles: int = 4
    """Compression + importance in one pass when the pooled blocks fit in this many key tiles (0: always two)."""
    chunk_blocks: int = 2
    """Selected blocks per step of the chunked selection kernel (1, 2 or 4; at most 256 keys per step)."""
    sel_queries_per_program: int = 4
    """Queries each chunked selection program takes one after the other."""
    sel_occupancy: int = 2
    """cuTile occupancy hint of the chunked selection kernel."""
    topn_stream_tile: tuple[int, int] = (64, 8)
    """Streaming top-n kernel: (rows, importance columns per chunk)."""
    topn_occupancy: int = 4
    """cuTile occupancy hint of the streaming top-n kernel."""
    pool_occupancy: int = 4
    """cuTile occupancy hint of the mean-pooling kernel."""

    def __post_init__(self) -> None:
        for name in ("cmp_tile", "window_tile", "topn_stream_tile"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and all(_is_pow2(x) for x in value)):
                raise ValueError(f"KernelConfig.{name}: a pair of powers of two, got {value!r}")
        if self.chunk_blocks not in (1, 2, 4) or isinstance(self.chunk_blocks, bool):
            raise ValueError(f"KernelConfig.chunk_blocks: 1, 2 or 4, got {self.chunk_blocks!r}")
        for name in ("sel_queries_per_program", "sel_occupancy", "topn_occupancy", "pool_occupancy"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"KernelConfig.{name}: an int >= 1, got {value!r}")
        if not (isinstance(self.cmp_one_pass_tiles, int) and not isinstance(self.cmp_one_pass_tiles, bool)
                and self.cmp_one_pass_tiles >= 0):
            raise ValueError(f"KernelConfig.cmp_one_pass_tiles: an int >= 0, got {self.cmp_one_pass_tiles!r}")

    def dense_tile(self, is_cmp: bool, G: int) -> tuple[int, int, int]:
        """``(GP, TMQ, TN)`` of the compression (``is_cmp``) or window kernel for a GQA group of G heads: the
        padded group, the queries per tile (rows // GP) and the keys (pooled blocks) per key tile."""
        rows, key_tile = self.cmp_tile if is_cmp else self.window_tile
        GP = pow2(G)
        return GP, max(1, rows // GP), key_tile

    def one_pass_tiles(self, nkeys: int, key_tile: int) -> int:
        """``NT1`` of the compression with importance: its number of key tiles when they fit the one pass, else 0."""
        key_tiles = -(-nkeys // key_tile)
        return key_tiles if key_tiles <= self.cmp_one_pass_tiles else 0

    def chunk(self, n: int, ls: int) -> int:
        """Selected blocks per step of the chunked selection for ``n`` blocks of ``l'`` keys: ``chunk_blocks``, at
        most 256 keys per step and at most the largest power of two <= n."""
        return max(1, min(self.chunk_blocks, max(1, 256 // ls), 1 << (n.bit_length() - 1)))

    def topn_tile(self, n_blocks: int) -> tuple[int, int]:
        """``(TR, CW)`` of the streaming top-n over rows of ``n_blocks`` selection blocks."""
        rows, cols = self.topn_stream_tile
        return rows, min(cols, pow2(n_blocks))


DEFAULT = KernelConfig()
