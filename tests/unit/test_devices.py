"""The UART, exit port, idle doorbell and the address buses (no KVM needed)."""
import pytest

from sealvm.core.bus import Bus, BusConflict
from sealvm.core.devices.actions import ConsoleOutput, GuestExit, Park
from sealvm.core.devices.serial import LSR, LSR_DR, LSR_THRE, THR_RBR, LCR, Serial16550
from sealvm.core.devices.simple import MAX_PARK_USECS, ExitPort, IdleDoorbell


def test_uart_transmit_is_console_output_and_always_ready():
    s = Serial16550()
    assert s.write(THR_RBR, ord("A")) == ConsoleOutput(b"A")
    assert s.read(LSR) & LSR_THRE


def test_uart_divisor_latch_does_not_print():
    s = Serial16550()
    s.write(LCR, 0x80)
    assert s.write(THR_RBR, 0x01) is None
    assert s.read(THR_RBR) == 0x01
    s.write(LCR, 0x03)
    assert s.write(THR_RBR, ord("x")) == ConsoleOutput(b"x")


def test_uart_receive_sets_data_ready_until_drained():
    s = Serial16550()
    assert not s.read(LSR) & LSR_DR
    s.feed(b"hi")
    assert s.read(LSR) & LSR_DR
    assert bytes([s.read(THR_RBR), s.read(THR_RBR)]) == b"hi"
    assert not s.read(LSR) & LSR_DR
    s.feed(b"x" * 100_000)  # input is bounded
    assert len(s._rx) <= 4096


def test_exit_port_reports_the_status_at_the_written_width():
    assert ExitPort().write(0, 0x1_0000_0005, 4) == GuestExit(5)
    assert ExitPort().write(0, 0x1FF, 1) == GuestExit(0xFF)


def test_idle_doorbell_parks_only_on_a_32bit_write_and_caps_the_time():
    d = IdleDoorbell()
    assert d.write(0, 1000, 4) == Park(1000)
    assert d.write(0, 0xFFFFFFFF, 4) == Park(MAX_PARK_USECS)
    assert d.write(4, 1000, 4) is None and d.write(0, 1000, 2) is None


def test_bus_routes_and_answers_unclaimed_like_hardware():
    b = Bus("t")
    seen = []
    b.add(0x100, 8, lambda o, n: o, lambda o, v, n: seen.append((o, v)), "dev")
    assert b.read(0x103, 1) == 3
    b.write(0x107, 9, 1)
    assert seen == [(7, 9)]
    assert b.read(0x108, 2) == 0xFFFF and b.unclaimed_reads == 1
    assert b.write(0x50, 1, 1) is None and b.unclaimed_writes == 1


def test_bus_refuses_overlaps():
    b = Bus("t")
    b.add(0x100, 0x10, None, None, "a")
    with pytest.raises(BusConflict):
        b.add(0x108, 0x10, None, None, "b")
    with pytest.raises(BusConflict):
        b.add(0xF8, 0x10, None, None, "c")
    b.add(0x110, 0x10, None, None, "d")
