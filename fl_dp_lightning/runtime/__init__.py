"""The client side: a client's state (its records, secret random streams and accountant, which never leave this
package), and the runtimes that train a round's clients and hand the server one :class:`~fl_dp_lightning.update.
ClientUpdate` each: Opacus inside Lightning's batch loop, the vectorized engine, and PySyft datasites."""
