"""Measuring a head on labelled images kept aside, and reviewing its mistakes."""
