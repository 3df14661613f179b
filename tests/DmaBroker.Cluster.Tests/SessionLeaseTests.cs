using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// When a replica must fence a lease (SPEC §16): at the send time of the last keepalive etcd
/// answered, plus the TTL, less the margin; never later, and never before.
/// </summary>
public sealed class SessionLeaseTests
{
    private static readonly TimeSpan Ttl = TimeSpan.FromSeconds(3);
    private static readonly TimeSpan Margin = TimeSpan.FromSeconds(1);

    [Fact]
    public void FenceDue_FromTheLastAnsweredSend_NotFromTheAnswer()
    {
        var clock = new FakeTimeProvider();
        var lease = new SessionLease(1, null, Ttl);
        var sent = clock.GetTimestamp();
        lease.Sent(sent);
        clock.Advance(TimeSpan.FromMilliseconds(900)); // a slow answer proves nothing past send + TTL
        Assert.True(lease.Answered(Ttl, clock));

        Assert.False(lease.FenceDue(Due(clock, sent, TimeSpan.FromMilliseconds(1999)), Margin, clock));
        Assert.True(lease.FenceDue(Due(clock, sent, TimeSpan.FromMilliseconds(2000)), Margin, clock));
        Assert.True(lease.Lost);
        Assert.False(lease.FenceDue(Due(clock, sent, TimeSpan.FromSeconds(5)), Margin, clock)); // fenced once
    }

    [Fact]
    public void Answered_EachRenewal_MovesTheDeadlineOn_AndTtlZeroLosesTheLease()
    {
        var clock = new FakeTimeProvider();
        var lease = new SessionLease(1, null, Ttl);
        var start = clock.GetTimestamp();
        lease.Sent(start);
        lease.Answered(Ttl, clock);
        clock.Advance(TimeSpan.FromMilliseconds(1500));
        lease.Sent(clock.GetTimestamp());
        lease.Answered(Ttl, clock);

        Assert.False(lease.FenceDue(Due(clock, start, TimeSpan.FromMilliseconds(3499)), Margin, clock));
        Assert.True(lease.FenceDue(Due(clock, start, TimeSpan.FromMilliseconds(3500)), Margin, clock));

        var gone = new SessionLease(2, null, Ttl);
        gone.Sent(clock.GetTimestamp());
        Assert.False(gone.Answered(TimeSpan.Zero, clock));
        Assert.True(gone.Lost);
    }

    [Fact]
    public void Answered_AfterAStreamBroke_PairsWithTheNewStreamsSend_NotTheUnansweredOnes()
    {
        var clock = new FakeTimeProvider();
        var lease = new SessionLease(1, null, Ttl);
        // Stream 1: three keepalives go out and are never answered (the stream broke, or a write was cut short).
        for (var i = 0; i < 3; i++)
        {
            lease.Sent(clock.GetTimestamp(), stream: 1);
            clock.Advance(TimeSpan.FromSeconds(1));
        }
        // Stream 2: one sent now and answered: the lease is alive until now + TTL, not the stale sends' + TTL.
        var sent = clock.GetTimestamp();
        lease.Sent(sent, stream: 2);
        Assert.True(lease.Answered(Ttl, clock, stream: 2));
        Assert.False(lease.FenceDue(Due(clock, sent, TimeSpan.FromMilliseconds(1999)), Margin, clock));

        // A late answer of stream 1, after stream 2's sends are queued, proves nothing: it moves nothing on.
        lease.Sent(Due(clock, sent, TimeSpan.FromSeconds(1)), stream: 2);
        Assert.True(lease.Answered(Ttl, clock, stream: 1));
        Assert.True(lease.FenceDue(Due(clock, sent, TimeSpan.FromMilliseconds(2000)), Margin, clock));
    }

    private static long Due(FakeTimeProvider clock, long from, TimeSpan after) =>
        from + (long)(after.TotalSeconds * clock.TimestampFrequency);
}
