"""Faithful local fakes of services outside our walls (hosted image APIs), served by the tests."""
