namespace DmaBroker.Cluster.Tests;

/// <summary>A change from etcd that keeps failing to apply is given up after a few tries in a row, so the watch goes on.</summary>
public sealed class ApplyFailuresTests
{
    [Fact]
    public void AChangeFailingLimitTimesInARow_IsGivenUp_AnotherRevisionOrASuccessStartsOver()
    {
        var failures = new ApplyFailures();
        const string key = "/dmabroker/groups/7";
        for (var i = 1; i < ApplyFailures.Limit; i++)
        {
            Assert.Equal(i, failures.Failed(key, 40));
            Assert.False(failures.GivenUp(key, 40));
        }
        Assert.Equal(ApplyFailures.Limit, failures.Failed(key, 40));
        Assert.True(failures.GivenUp(key, 40));
        // The key's next change is tried afresh; so is another key's.
        Assert.False(failures.GivenUp(key, 41));
        Assert.False(failures.GivenUp("/dmabroker/groups/8", 40));
        Assert.Equal(1, failures.Failed(key, 41));
        Assert.False(failures.GivenUp(key, 40));

        failures.Failed(key, 41);
        failures.Applied(key);
        Assert.Equal(1, failures.Failed(key, 41));
    }
}
