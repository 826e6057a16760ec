"""CronExpr and Schedule (section "Schedule"): pure functions of a given time.

No test sleeps or reads the clock: every instant is passed in.
"""

import unittest
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from nexo_poller import CronExpr, Schedule, _parse_instant, _wall_to_utc

UTC = timezone.utc
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def fires(expr, start, count, tz=UTC):
    """The next ``count`` firings of ``expr`` strictly after ``start``."""
    cron = expr if isinstance(expr, CronExpr) else CronExpr(expr)
    out, t = [], start
    for _ in range(count):
        t = cron.next_after(t, tz)
        out.append(t)
    return out


class CronParsingTest(unittest.TestCase):

    def test_six_fields_seconds_first(self):
        c = CronExpr("15 30 10 * * *")
        self.assertEqual(c.seconds, [15])
        self.assertEqual(c.minutes, [30])
        self.assertEqual(c.hours, [10])
        self.assertEqual(c.next_after(utc(2026, 5, 17, 9, 0)), utc(2026, 5, 17, 10, 30, 15))

    def test_five_fields_minute_first_seconds_zero(self):
        c = CronExpr("30 10 * * *")
        self.assertEqual(c.seconds, [0])
        self.assertEqual(c.minutes, [30])
        self.assertEqual(c.hours, [10])
        self.assertEqual(c.next_after(utc(2026, 5, 17, 9, 0)), utc(2026, 5, 17, 10, 30, 0))

    def test_text_is_kept(self):
        self.assertEqual(CronExpr("0 */5 * * * *").text, "0 */5 * * * *")

    def test_extra_whitespace_is_fine(self):
        self.assertEqual(CronExpr("  0   */5 *\t* * *  ").minutes, list(range(0, 60, 5)))

    def test_star_step(self):
        self.assertEqual(CronExpr("*/15 * * * * *").seconds, [0, 15, 30, 45])
        self.assertEqual(CronExpr("0 */20 * * * *").minutes, [0, 20, 40])

    def test_range(self):
        self.assertEqual(CronExpr("0 0 9-17 * * *").hours, list(range(9, 18)))

    def test_range_with_step(self):
        self.assertEqual(CronExpr("10-50/10 * * * * *").seconds, [10, 20, 30, 40, 50])
        self.assertEqual(CronExpr("0 1-10/4 * * * *").minutes, [1, 5, 9])

    def test_start_with_step_runs_to_field_end(self):
        self.assertEqual(CronExpr("5/20 * * * * *").seconds, [5, 25, 45])
        self.assertEqual(CronExpr("0 0 3/6 * * *").hours, [3, 9, 15, 21])

    def test_list(self):
        self.assertEqual(CronExpr("0 0 0 1,15,28 * *").days, [1, 15, 28])
        self.assertEqual(CronExpr("0,30 1-2,5 * * * *").minutes, [1, 2, 5])
        self.assertEqual(CronExpr("0,30 1-2,5 * * * *").seconds, [0, 30])

    def test_duplicate_values_in_list_collapse(self):
        self.assertEqual(CronExpr("0 0 0 1,1,1-2 * *").days, [1, 2])

    def test_month_names_any_case(self):
        self.assertEqual(CronExpr("0 0 0 1 JAN *").months, [1])
        self.assertEqual(CronExpr("0 0 0 1 jan *").months, [1])
        self.assertEqual(CronExpr("0 0 0 1 Jan,MAR,dec *").months, [1, 3, 12])
        self.assertEqual(CronExpr("0 0 0 1 feb-apr *").months, [2, 3, 4])

    def test_day_names(self):
        self.assertEqual(CronExpr("0 0 0 * * mon-fri").dows, {1, 2, 3, 4, 5})
        self.assertEqual(CronExpr("0 0 0 * * SAT,sun").dows, {6, 0})

    def test_seven_is_sunday(self):
        self.assertEqual(CronExpr("0 0 0 * * 7").dows, {0})
        self.assertEqual(CronExpr("0 0 0 * * 5-7").dows, {5, 6, 0})
        # 2026-05-17 is a Sunday; 7 and 0 and "sun" agree.
        start = utc(2026, 5, 14)
        expected = utc(2026, 5, 17)
        for dow in ("7", "0", "sun", "SUN"):
            with self.subTest(dow=dow):
                self.assertEqual(CronExpr(f"0 0 0 * * {dow}").next_after(start), expected)

    def test_question_mark_means_any(self):
        c = CronExpr("0 0 12 ? * mon")
        self.assertEqual(c.days, list(range(1, 32)))
        # Only Mondays (not "every day OR monday"): 2026-05-17 Sun -> Mon 18 -> Mon 25.
        self.assertEqual(fires(c, utc(2026, 5, 17), 2),
                         [utc(2026, 5, 18, 12), utc(2026, 5, 25, 12)])
        c = CronExpr("0 0 12 15 * ?")
        self.assertEqual(fires(c, utc(2026, 5, 1), 2),
                         [utc(2026, 5, 15, 12), utc(2026, 6, 15, 12)])

    def test_day_of_month_only(self):
        self.assertEqual(fires("0 0 1 * *", utc(2026, 5, 17), 2),
                         [utc(2026, 6, 1), utc(2026, 7, 1)])

    def test_day_of_week_only(self):
        # Weekdays from Friday 2026-05-15 noon: Mon 18 .. Fri 22, skipping the weekend.
        got = fires("0 9 * * mon-fri", utc(2026, 5, 15, 12), 5)
        self.assertEqual(got, [utc(2026, 5, d, 9) for d in (18, 19, 20, 21, 22)])

    def test_vixie_or_when_both_days_restricted(self):
        # "the 13th OR any Friday" (March 2026: Fridays 6, 13, 20, 27; the 13th is one).
        got = fires("0 0 0 13 * fri", utc(2026, 3, 1), 5)
        self.assertEqual(got, [utc(2026, 3, 6), utc(2026, 3, 13), utc(2026, 3, 20),
                               utc(2026, 3, 27), utc(2026, 4, 3)])
        # April 2026: the 13th is a Monday and still fires.
        got = fires("0 0 0 13 * fri", utc(2026, 4, 4), 2)
        self.assertEqual(got, [utc(2026, 4, 10), utc(2026, 4, 13)])

    def test_vixie_or_month_still_restricts(self):
        # The day OR applies inside the allowed months only.
        got = fires("0 0 1 jun mon", utc(2026, 5, 1), 3)
        self.assertEqual(got, [utc(2026, 6, 1), utc(2026, 6, 8), utc(2026, 6, 15)])

    def test_non_string_is_rejected(self):
        with self.assertRaises(ValueError):
            CronExpr(None)
        with self.assertRaises(ValueError):
            CronExpr(5)


class CronErrorTest(unittest.TestCase):

    def assertCronError(self, text, *needles):
        with self.assertRaises(ValueError) as ctx:
            CronExpr(text)
        msg = str(ctx.exception)
        for needle in needles:
            self.assertIn(needle, msg)
        return msg

    def test_wrong_field_count(self):
        self.assertCronError("* * * *", "4 fields", "5", "6")
        self.assertCronError("0 0 0 * * * *", "7 fields")
        self.assertCronError("", "0 fields")

    def test_out_of_range(self):
        self.assertCronError("60 * * * * *", "second", "60", "0-59")
        self.assertCronError("0 60 * * * *", "minute", "60")
        self.assertCronError("0 0 24 * * *", "hour", "24")
        self.assertCronError("0 0 0 0 * *", "day of month", "0")
        self.assertCronError("0 0 0 32 * *", "day of month", "32")
        self.assertCronError("0 0 0 1 13 *", "month", "13")
        self.assertCronError("0 0 0 1 0 *", "month", "0")
        self.assertCronError("0 0 0 * * 8", "day of week", "8")
        self.assertCronError("0 0 0-99 * * *", "hour", "99")

    def test_backwards_range(self):
        self.assertCronError("0 0 17-9 * * *", "hour", "17-9", "backwards")
        self.assertCronError("0 0 0 * * fri-mon", "day of week", "backwards")

    def test_bad_step(self):
        self.assertCronError("*/x * * * * *", "second", "step", "x")
        self.assertCronError("*/-1 * * * * *", "second")
        self.assertCronError("*/1.5 * * * * *", "second", "step")

    def test_empty_step_is_rejected(self):
        # A "/" with nothing after it is a typo, not "step 1".
        self.assertCronError("*/ * * * * *", "second", "step")
        self.assertCronError("0 5/ * * * *", "minute", "step")

    def test_step_zero(self):
        self.assertCronError("*/0 * * * * *", "step", "0")
        self.assertCronError("0 1-5/0 * * * *", "minute", "step")

    def test_unknown_name(self):
        self.assertCronError("0 0 0 1 foo *", "month", "foo")
        self.assertCronError("0 0 0 * * mon-xyz", "day of week", "xyz")
        # Names belong to their own field only.
        self.assertCronError("0 0 0 * * jan", "day of week", "jan")
        self.assertCronError("0 0 0 * mon *", "month", "mon")
        self.assertCronError("0 jan * * * *", "minute", "jan")

    def test_garbage_tokens(self):
        self.assertCronError("1,,2 * * * * *", "second")
        self.assertCronError("-5 * * * * *", "second")
        self.assertCronError("a b c d e", "minute", "'a'")

    def test_non_ascii_digits_rejected_with_clear_message(self):
        # str.isdigit() accepts these; they are not cron numbers.
        for text in ("0 0 \u00b2 * * *",      # superscript two
                     "0 0 \u0661 * * *"):     # ARABIC-INDIC DIGIT ONE
            with self.subTest(text=text):
                self.assertCronError(text, "hour")

    def test_never_firing(self):
        self.assertCronError("0 0 31 2 *", "never fires")
        self.assertCronError("0 0 0 30,31 feb *", "never fires")
        self.assertCronError("0 0 0 31 apr,jun,sep,nov ?", "never fires")

    def test_rare_but_possible_is_fine(self):
        # Accepted, and they fire when the calendar allows it.
        after = utc(2026, 5, 17, 10, 0)
        leap = CronExpr("0 0 29 2 *")
        self.assertEqual(leap.next_after(after), utc(2028, 2, 29))
        self.assertEqual(leap.next_after(utc(2028, 2, 29)), utc(2032, 2, 29))
        # Only March has a 31st of the two months.
        self.assertEqual(CronExpr("0 0 31 2,3 *").next_after(after), utc(2027, 3, 31))
        # Restricted day of week makes it fire on Mondays in February (Vixie OR).
        mondays = CronExpr("0 0 31 2 mon")
        self.assertEqual(mondays.next_after(after), utc(2027, 2, 1))
        self.assertEqual(mondays.next_after(utc(2027, 2, 1)), utc(2027, 2, 8))


class CronNextAfterTest(unittest.TestCase):

    def test_strictly_after(self):
        c = CronExpr("0 */5 * * * *")
        self.assertEqual(c.next_after(utc(2026, 5, 17, 10, 0)), utc(2026, 5, 17, 10, 5))
        self.assertEqual(c.next_after(utc(2026, 5, 17, 10, 4, 59)), utc(2026, 5, 17, 10, 5))

    def test_strictly_after_every_second(self):
        c = CronExpr("* * * * * *")
        self.assertEqual(c.next_after(utc(2026, 5, 17, 10, 0, 0)), utc(2026, 5, 17, 10, 0, 1))

    def test_sub_second_input(self):
        c = CronExpr("* * * * * *")
        t = utc(2026, 5, 17, 10, 0, 0, 500_000)
        self.assertEqual(c.next_after(t), utc(2026, 5, 17, 10, 0, 1))
        c = CronExpr("0 * * * * *")
        t = utc(2026, 5, 17, 10, 0, 59, 999_999)
        self.assertEqual(c.next_after(t), utc(2026, 5, 17, 10, 1, 0))

    def test_chained_calls_increase(self):
        got = fires("*/15 * * * * *", utc(2026, 5, 17, 10, 0), 5)
        self.assertEqual(got, [utc(2026, 5, 17, 10, 0, s) for s in (15, 30, 45)]
                         + [utc(2026, 5, 17, 10, 1, 0), utc(2026, 5, 17, 10, 1, 15)])

    def test_input_in_other_offset(self):
        c = CronExpr("0 0 12 * * *")
        plus2 = timezone(timedelta(hours=2))
        # 13:00+02:00 is 11:00 UTC: the next UTC noon is the same day.
        got = c.next_after(datetime(2026, 5, 17, 13, 0, tzinfo=plus2))
        self.assertEqual(got, utc(2026, 5, 17, 12))

    def test_result_is_utc(self):
        for tz in (UTC, NY, BERLIN):
            with self.subTest(tz=str(tz)):
                got = CronExpr("0 0 12 * * *").next_after(utc(2026, 5, 17), tz)
                self.assertIs(got.tzinfo, UTC)
                self.assertEqual(got.utcoffset(), timedelta(0))

    def test_tz_wall_time(self):
        # Noon in New York (EDT, -4) is 16:00 UTC; in Berlin (CEST, +2) 10:00 UTC.
        c = CronExpr("0 0 12 * * *")
        self.assertEqual(c.next_after(utc(2026, 5, 17), NY), utc(2026, 5, 17, 16))
        self.assertEqual(c.next_after(utc(2026, 5, 17), BERLIN), utc(2026, 5, 17, 10))
        # Winter: EST -5, CET +1.
        self.assertEqual(c.next_after(utc(2026, 1, 17), NY), utc(2026, 1, 17, 17))
        self.assertEqual(c.next_after(utc(2026, 1, 17), BERLIN), utc(2026, 1, 17, 11))

    def test_day_is_the_tz_day(self):
        # Monday 00:30 in Berlin is Sunday 22:30 UTC in summer.
        c = CronExpr("0 30 0 * * mon")
        self.assertEqual(c.next_after(utc(2026, 5, 16), BERLIN), utc(2026, 5, 17, 22, 30))

    def test_jan_31_to_feb_28(self):
        # Days 28-31 of each month: after Jan 31 comes Feb 28, then Mar 28.
        got = fires("0 0 28-31 * *", utc(2026, 1, 31), 3)
        self.assertEqual(got, [utc(2026, 2, 28), utc(2026, 3, 28), utc(2026, 3, 29)])

    def test_jan_31_daily_rolls_into_february(self):
        self.assertEqual(CronExpr("0 0 * * *").next_after(utc(2026, 1, 31, 0, 0)),
                         utc(2026, 2, 1))

    def test_day_30_skips_february(self):
        self.assertEqual(CronExpr("0 0 30 * *").next_after(utc(2026, 1, 31)),
                         utc(2026, 3, 30))

    def test_day_31_skips_short_months(self):
        got = fires("0 0 31 * *", utc(2026, 1, 1), 7)
        self.assertEqual(got, [utc(2026, 1, 31), utc(2026, 3, 31), utc(2026, 5, 31),
                               utc(2026, 7, 31), utc(2026, 8, 31), utc(2026, 10, 31),
                               utc(2026, 12, 31)])

    def test_leap_day(self):
        self.assertEqual(CronExpr("0 0 29 2 *").next_after(utc(2026, 1, 1)),
                         utc(2028, 2, 29))
        self.assertEqual(CronExpr("0 0 29 2 *").next_after(utc(2028, 2, 29)),
                         utc(2032, 2, 29))

    def test_leap_day_century(self):
        # 2100 is not a leap year: from 2096-03-01 the next 29 Feb is 2104.
        self.assertEqual(CronExpr("0 0 29 2 *").next_after(utc(2096, 3, 1)),
                         utc(2104, 2, 29))

    def test_year_rollover(self):
        last = utc(2026, 12, 31, 23, 59, 59)
        self.assertEqual(CronExpr("* * * * * *").next_after(last), utc(2027, 1, 1, 0, 0, 0))
        self.assertEqual(CronExpr("0 0 0 1 1 *").next_after(last), utc(2027, 1, 1))
        self.assertEqual(CronExpr("59 59 23 31 12 *").next_after(last),
                         utc(2027, 12, 31, 23, 59, 59))
        self.assertEqual(CronExpr("59 59 23 31 12 *").next_after(utc(2026, 12, 31, 23, 59, 58)),
                         last)


class CronDstTest(unittest.TestCase):

    def test_spring_forward_gap_is_skipped_new_york(self):
        # 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        c = CronExpr("0 30 2 * * *")
        start = datetime(2026, 3, 8, 0, 0, tzinfo=NY)
        got = c.next_after(start, NY)
        self.assertEqual(got, utc(2026, 3, 9, 6, 30))        # 02:30 EDT next day
        self.assertEqual(got.astimezone(NY).replace(tzinfo=None), datetime(2026, 3, 9, 2, 30))
        # The day before still fires normally (EST).
        self.assertEqual(c.next_after(datetime(2026, 3, 7, 0, 0, tzinfo=NY), NY),
                         utc(2026, 3, 7, 7, 30))

    def test_spring_forward_gap_is_skipped_berlin(self):
        # 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        c = CronExpr("0 30 2 * * *")
        got = c.next_after(datetime(2026, 3, 29, 0, 0, tzinfo=BERLIN), BERLIN)
        self.assertEqual(got, utc(2026, 3, 30, 0, 30))

    def test_fall_back_ambiguous_fires_once_new_york(self):
        # 2026-11-01: 01:30 happens at 05:30 UTC (EDT) and at 06:30 UTC (EST).
        c = CronExpr("0 30 1 * * *")
        first = c.next_after(utc(2026, 11, 1, 0, 0), NY)
        self.assertEqual(first, utc(2026, 11, 1, 5, 30))
        second = c.next_after(first, NY)
        self.assertEqual(second, utc(2026, 11, 2, 6, 30))
        # Asking from inside the repeated hour does not fire the second 01:30.
        self.assertEqual(c.next_after(utc(2026, 11, 1, 6, 0), NY), utc(2026, 11, 2, 6, 30))
        self.assertEqual(c.next_after(utc(2026, 11, 1, 6, 30), NY), utc(2026, 11, 2, 6, 30))

    def test_fall_back_ambiguous_fires_once_berlin(self):
        # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        c = CronExpr("0 30 2 * * *")
        first = c.next_after(utc(2026, 10, 24, 22, 0), BERLIN)
        self.assertEqual(first, utc(2026, 10, 25, 0, 30))
        self.assertEqual(c.next_after(first, BERLIN), utc(2026, 10, 26, 1, 30))

    def assertStrictlyIncreasing(self, instants):
        for a, b in zip(instants, instants[1:]):
            self.assertLess(a, b)
        self.assertEqual(len(set(instants)), len(instants))

    def test_hourly_across_spring_forward(self):
        for tz, start in ((NY, utc(2026, 3, 8, 3)), (BERLIN, utc(2026, 3, 28, 22))):
            with self.subTest(tz=str(tz)):
                got = fires("0 0 * * * *", start, 8, tz)
                self.assertStrictlyIncreasing(got)
                # Every hour in UTC: the 02:00 wall hour simply does not exist.
                self.assertEqual(got, [start + timedelta(hours=h) for h in range(1, 9)])
                walls = [g.astimezone(tz).hour for g in got]
                self.assertNotIn(2, walls)

    def test_hourly_across_fall_back(self):
        for tz, start in ((NY, utc(2026, 11, 1, 2)), (BERLIN, utc(2026, 10, 24, 21))):
            with self.subTest(tz=str(tz)):
                got = fires("0 0 * * * *", start, 8, tz)
                self.assertStrictlyIncreasing(got)
                walls = [g.astimezone(tz).replace(tzinfo=None) for g in got]
                self.assertEqual(len(set(walls)), len(walls))   # no wall hour twice
                for g in got:
                    self.assertEqual((g.minute, g.second), (0, 0))

    def test_every_fifteen_minutes_across_both_changes(self):
        for tz in (NY, BERLIN):
            for start in (utc(2026, 3, 7), utc(2026, 10, 24)):
                with self.subTest(tz=str(tz), start=start):
                    got = fires("0 */15 * * * *", start, 4 * 24 * 3, tz)
                    self.assertStrictlyIncreasing(got)
                    for g in got:
                        self.assertIs(g.tzinfo, UTC)


class WallToUtcTest(unittest.TestCase):

    def test_ordinary(self):
        self.assertEqual(_wall_to_utc(datetime(2026, 5, 17, 12, 0), NY), utc(2026, 5, 17, 16))
        self.assertEqual(_wall_to_utc(datetime(2026, 5, 17, 12, 0), UTC), utc(2026, 5, 17, 12))

    def test_gap_is_none(self):
        self.assertIsNone(_wall_to_utc(datetime(2026, 3, 8, 2, 30), NY))
        self.assertIsNone(_wall_to_utc(datetime(2026, 3, 29, 2, 30), BERLIN))

    def test_ambiguous_is_first_occurrence(self):
        self.assertEqual(_wall_to_utc(datetime(2026, 11, 1, 1, 30), NY), utc(2026, 11, 1, 5, 30))
        self.assertEqual(_wall_to_utc(datetime(2026, 10, 25, 2, 30), BERLIN),
                         utc(2026, 10, 25, 0, 30))


class ParseInstantTest(unittest.TestCase):

    def test_z_and_offsets(self):
        self.assertEqual(_parse_instant("2026-04-26T15:00:00Z"), utc(2026, 4, 26, 15))
        self.assertEqual(_parse_instant("2026-04-26T15:00:00z"), utc(2026, 4, 26, 15))
        self.assertEqual(_parse_instant("2026-04-26T15:00:00+02:00"), utc(2026, 4, 26, 13))
        self.assertEqual(_parse_instant("2026-04-26T15:00:00.250-05:00"),
                         utc(2026, 4, 26, 20, 0, 0, 250_000))

    def test_result_is_utc(self):
        self.assertIs(_parse_instant("2026-04-26T15:00:00+02:00").tzinfo, UTC)

    def test_offset_required(self):
        with self.assertRaises(ValueError) as ctx:
            _parse_instant("2026-04-26T15:00:00")
        self.assertIn("offset", str(ctx.exception))

    def test_garbage_and_non_strings(self):
        for bad in ("garbage", "", 1714143600, None):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                _parse_instant(bad)


class ScheduleTest(unittest.TestCase):

    T0 = utc(2026, 5, 17, 10, 0).timestamp()

    def test_nominal_interval(self):
        self.assertEqual(Schedule(every_secs=300).nominal_interval, 300)
        self.assertEqual(Schedule(every_secs=0.5).nominal_interval, 0.5)
        self.assertEqual(Schedule(cron=CronExpr("0 */5 * * * *")).nominal_interval, 60)
        self.assertEqual(Schedule(at=utc(2026, 4, 26, 15)).nominal_interval, 0)

    def test_first_after_every_is_now(self):
        self.assertEqual(Schedule(every_secs=60).first_after(self.T0), self.T0)

    def test_first_after_at_is_the_instant(self):
        at = utc(2026, 6, 1, 12)
        self.assertEqual(Schedule(at=at).first_after(self.T0), at.timestamp())
        # An instant already past is still its own instant (run as soon as possible).
        past = utc(2026, 1, 1)
        self.assertEqual(Schedule(at=past).first_after(self.T0), past.timestamp())

    def test_first_after_cron_is_next_fire(self):
        s = Schedule(cron=CronExpr("0 */5 * * * *"))
        self.assertEqual(s.first_after(self.T0), utc(2026, 5, 17, 10, 5).timestamp())
        self.assertEqual(s.first_after(self.T0 + 1), utc(2026, 5, 17, 10, 5).timestamp())

    def test_first_after_cron_uses_tz(self):
        s = Schedule(cron=CronExpr("0 0 12 * * *"), tz=NY)
        self.assertEqual(s.first_after(self.T0), utc(2026, 5, 17, 16).timestamp())

    def test_every_next_is_slot_plus_n(self):
        s = Schedule(every_secs=60)
        self.assertEqual(s.next_after(self.T0, self.T0), self.T0 + 60)
        self.assertEqual(s.next_after(self.T0, self.T0 + 5), self.T0 + 60)
        # No drift: the next slot counts from the slot, not from when the tick ended.
        self.assertEqual(s.next_after(self.T0 + 60, self.T0 + 75), self.T0 + 120)
        # A slot exactly at `now` is the run happening now: the next is later.
        self.assertEqual(s.next_after(self.T0, self.T0 + 60), self.T0 + 120)

    def test_every_missed_slots_are_skipped_keeping_phase(self):
        # The tick at `now` stood in for every missed slot; the next one is
        # the first slot of the original phase strictly after `now`.
        s = Schedule(every_secs=60)
        now = self.T0 + 3600 * 24 + 7
        self.assertEqual(s.next_after(self.T0, now), self.T0 + 3600 * 24 + 60)
        self.assertEqual(s.next_after(self.T0, self.T0 + 61), self.T0 + 120)

    def test_cron_next(self):
        s = Schedule(cron=CronExpr("0 */5 * * * *"))
        slot = utc(2026, 5, 17, 10, 5).timestamp()
        self.assertEqual(s.next_after(slot, slot + 2), utc(2026, 5, 17, 10, 10).timestamp())

    def test_cron_next_uses_tz(self):
        s = Schedule(cron=CronExpr("0 30 1 * * *"), tz=NY)
        slot = utc(2026, 11, 1, 5, 30).timestamp()
        self.assertEqual(s.next_after(slot, slot), utc(2026, 11, 2, 6, 30).timestamp())

    def test_cron_missed_slots_are_skipped(self):
        s = Schedule(cron=CronExpr("0 */5 * * * *"))
        now = self.T0 + 3 * 3600 + 7
        self.assertEqual(s.next_after(self.T0, now), self.T0 + 3 * 3600 + 300)

    def test_at_is_none_after_firing(self):
        at = utc(2026, 6, 1, 12)
        s = Schedule(at=at)
        self.assertIsNone(s.next_after(at.timestamp(), at.timestamp()))
        self.assertIsNone(s.next_after(at.timestamp(), at.timestamp() + 3600))


if __name__ == "__main__":
    unittest.main()
