-- A booking is confirmed once it is not cancelled and paid in full.
SELECT id FROM public.bookings b
WHERE b.status <> 'cancelled'
  AND b.paid_cents >= b.price_cents
